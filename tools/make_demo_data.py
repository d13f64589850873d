"""Writes the "Camera Motion" demo set: class folders of short VP9 videos whose class is the camera's motion.

    python tools/make_demo_data.py --out_dir demo_out/videos [--num_train 400 --num_val 100 --seed 0]

Output: <out_dir>/{train,val}/<class>/<split>_<index>.webm and <out_dir>/camera_motion.json (the summary).
"""

from __future__ import annotations

import argparse
import json

from mae_st.demo.camera_motion import DEFAULT_CLASSES, generate_camera_motion


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--num_train", type=int, default=400)
    parser.add_argument("--num_val", type=int, default=100)
    parser.add_argument("--num_frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    parser.add_argument("--fps", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=DEFAULT_CLASSES,
                        help="motion classes to generate (labels cycle through them in this order)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = generate_camera_motion(
        args.out_dir, num_train=args.num_train, num_val=args.num_val, num_frames=args.num_frames,
        size=args.size, seed=args.seed, fps=args.fps, classes=args.classes,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
