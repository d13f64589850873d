"""The built-in demo: "Moving Digits", a tiny action-recognition set rendered from scikit-learn's digits."""

from mae_st.demo.moving_digits import CLASS_MOTIONS, DEFAULT_CLASSES, generate_moving_digits, render_split, render_video

__all__ = ["CLASS_MOTIONS", "DEFAULT_CLASSES", "generate_moving_digits", "render_split", "render_video"]
