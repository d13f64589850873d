"""The built-in demo: "Camera Motion", a tiny action-recognition set of camera pans, tilts and zooms over
scikit-learn's sample photographs."""

from mae_st.demo.camera_motion import CLASS_MOTIONS, DEFAULT_CLASSES, generate_camera_motion, render_split, render_video

__all__ = ["CLASS_MOTIONS", "DEFAULT_CLASSES", "generate_camera_motion", "render_split", "render_video"]
