"""Golden TensorBoard image events (Tests/TrainingTests/SamplePromptTests.swift testTensorBoardImageEventIsTensorBoards).

Run from the repository root (tensorboard installed): python3 Tests/Fixtures/sampling/make_tfevents_image.py

Serialises, with tensorboard's own protobuf classes, the Event that torch's SummaryWriter.add_image writes for an
already encoded image — Event{wall_time, step, summary{value{tag, image{height, width, colorspace 3, encoded_image_string}}}}
— for a few inputs (the "PNG" bytes are arbitrary: the encoding does not look at them), and writes
tfevents_image.json: [{tag, width, height, step, wall_time, png_hex, event_hex}].
"""
import json
import os

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [dict(tag="sample_0", width=128, height=128, step=200, wall_time=1796375852.25, png=bytes(range(256)) * 3),
         dict(tag="sample_12", width=1216, height=832, step=3_000_000_000, wall_time=1796375900.0625, png=b"\x89PNG" + bytes(40)),
         dict(tag="sample_1", width=64, height=96, step=0, wall_time=0.5, png=b"")]


def main():
    out = []
    for c in CASES:
        image = Summary.Image(height=c["height"], width=c["width"], colorspace=3, encoded_image_string=c["png"])
        event = Event(wall_time=c["wall_time"], step=c["step"], summary=Summary(value=[Summary.Value(tag=c["tag"], image=image)]))
        out.append({k: v for k, v in c.items() if k != "png"} | {"png_hex": c["png"].hex(), "event_hex": event.SerializeToString().hex()})
    with open(os.path.join(HERE, "tfevents_image.json"), "w") as f:
        json.dump({"produced_by": "Tests/Fixtures/sampling/make_tfevents_image.py (tensorboard protobuf)", "cases": out}, f, indent=1)


if __name__ == "__main__":
    main()
