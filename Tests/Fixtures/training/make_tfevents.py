"""Golden TensorBoard event file for the metrics writer (Tests/TrainingTests/ReportTests.swift).

Run from the repository root (PyTorch + tensorboard, CPU):

    pip install --no-deps tensorboard protobuf absl-py     # never lets pip touch torch
    python3 Tests/Fixtures/training/make_tfevents.py

Writes, next to this script:

  tfevents_input.json  {"file_version_wall_time": t0, "steps": [...]}: a fixed sequence of step metrics in the
                       JSONL schema of `MetricsWriter` (snake_case keys, non-finite numbers as the strings
                       "NaN" / "Infinity" / "-Infinity", plus "wall_time" per step).
  tfevents_golden.bin  the event file `torch.utils.tensorboard.SummaryWriter` writes for that sequence:
                       TFRecord framing of `Event` protobufs, first record `file_version = "brain.Event:2"`
                       at t0, then one `Event{wall_time, step, summary{value{tag, simple_value}}}` per scalar.

  loss_average_golden.json  kohya's `LossRecorder.moving_average` (sd-scripts library/train_util.py, copied below)
                       after each of 3 epochs x 5 steps of seeded losses: the reference for
                       `MovingLossAverage(window: 5)`.

The tags and their order are the ones `MetricsWriter.write` documents (kohya-style names): loss/current,
loss/average, lr/<group> (groups sorted by name), grad_norm (when present), time/step,
time/communication, compression_ratio (when present), images_per_second.

The wall times are fixed: SummaryWriter takes `walltime=` per scalar, and the file_version record's
time comes from `time.time()` inside tensorboard's EventFileWriter, which is patched here to return t0.
The file is read back with tensorboard's own record reader (`RawEventFileLoader`, CRC-checked) and every record is checked
against the inputs before it is kept.
"""

import json
import math
import os
import random
import shutil
import tempfile
import time
from typing import List

import torch
from torch.utils.tensorboard import SummaryWriter
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event

HERE = os.path.dirname(os.path.abspath(__file__))
T0 = 1763740800.125  # 2025-11-21T16:00:00.125Z; fractional to exercise the double field

# Steps chosen to cover the encodings: 1-byte and multi-byte varint steps, a step above 2^31 (int64),
# absent optional values, a skipped step with a NaN loss and infinite gradient norm, several lr groups,
# values that are not exact in float32 (simple_value is a float: both writers round to nearest).
STEPS = [
    dict(step=1, epoch=1, loss=0.1234567890123, loss_average=0.1234567890123,
         lr={"unet": 1e-4, "textencoder": 5e-5}, grad_norm=1.5, step_seconds=20.25,
         communication_seconds=0.75, compression_ratio=3.9, images_per_second=0.2, skipped=False),
    dict(step=2, epoch=1, loss=0.087, loss_average=0.10522839450615, lr={"unet": 9.5e-5, "textencoder": 4.75e-5},
         grad_norm=None, step_seconds=19.5, communication_seconds=0.5, compression_ratio=None,
         images_per_second=0.205128205128, skipped=False),
    dict(step=300, epoch=3, loss=float("nan"), loss_average=0.0991, lr={"unet": 0.0},
         grad_norm=float("inf"), step_seconds=0.001, communication_seconds=0.0, compression_ratio=1.0,
         images_per_second=4000.0, skipped=True),
    dict(step=3_000_000_000, epoch=70000, loss=1e-8, loss_average=2.5e-7, lr={"unet": 1e-6},
         grad_norm=0.0, step_seconds=1e6, communication_seconds=123.456, compression_ratio=16.0,
         images_per_second=1e-6, skipped=False),
]
WALL_TIMES = [T0 + 20.5, T0 + 40.0625, T0 + 6000.333333, T0 + 1e7 + 0.1]


def scalars(m):
    """(tag, value) in MetricsWriter's documented order."""
    out = [("loss/current", m["loss"]), ("loss/average", m["loss_average"])]
    out += [(f"lr/{group}", m["lr"][group]) for group in sorted(m["lr"])]
    if m["grad_norm"] is not None:
        out.append(("grad_norm", m["grad_norm"]))
    out += [("time/step", m["step_seconds"]), ("time/communication", m["communication_seconds"])]
    if m["compression_ratio"] is not None:
        out.append(("compression_ratio", m["compression_ratio"]))
    out.append(("images_per_second", m["images_per_second"]))
    return out


def json_number(x):
    if x is None or math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


class LossRecorder:
    """kohya-ss/sd-scripts library/train_util.py, verbatim (train_network.py calls add(epoch=epoch, step=step,
    loss=current_loss) with the 0-based epoch and the 0-based step within the epoch, then shows moving_average
    as avr_loss)."""

    def __init__(self):
        self.loss_list: List[float] = []
        self.loss_total: float = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        losses = len(self.loss_list)
        if losses == 0:
            return 0
        return self.loss_total / losses


def write_loss_average_golden():
    rng = random.Random(6)
    recorder = LossRecorder()
    losses, averages = [], []
    for epoch in range(3):
        for step in range(5):
            loss = rng.uniform(0.02, 0.3)
            recorder.add(epoch=epoch, step=step, loss=loss)
            losses.append(loss)
            averages.append(recorder.moving_average)
    with open(os.path.join(HERE, "loss_average_golden.json"), "w") as f:
        json.dump({"steps_per_epoch": 5, "losses": losses, "moving_averages": averages}, f, indent=1)
        f.write("\n")


def main():
    write_loss_average_golden()
    logdir = tempfile.mkdtemp()
    real_time = time.time
    time.time = lambda: T0  # the file_version record's wall_time (and the file name)
    try:
        writer = SummaryWriter(log_dir=logdir)
    finally:
        time.time = real_time
    for m, wall in zip(STEPS, WALL_TIMES):
        for tag, value in scalars(m):
            writer.add_scalar(tag, value, global_step=m["step"], walltime=wall)
    writer.close()
    (name,) = [f for f in os.listdir(logdir) if "tfevents" in f]
    path = os.path.join(logdir, name)

    # Read back with tensorboard's reader: framing, CRCs and every field must be what was asked for.
    events = [Event.FromString(record) for record in RawEventFileLoader(path).Load()]
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time == T0, events[0]
    expected = [(w, m["step"], tag, v) for m, w in zip(STEPS, WALL_TIMES) for tag, v in scalars(m)]
    assert len(events) == 1 + len(expected), (len(events), len(expected))
    for event, (wall, step, tag, value) in zip(events[1:], expected):
        (v,) = event.summary.value
        f32 = torch.tensor(value, dtype=torch.float32).item()
        assert event.wall_time == wall and event.step == step and v.tag == tag, (event, wall, step, tag)
        assert (math.isnan(f32) and math.isnan(v.simple_value)) or v.simple_value == f32, (v, f32)

    shutil.copyfile(path, os.path.join(HERE, "tfevents_golden.bin"))
    steps = []
    for m, wall in zip(STEPS, WALL_TIMES):
        steps.append(dict(
            step=m["step"], epoch=m["epoch"], loss=json_number(m["loss"]),
            loss_average=json_number(m["loss_average"]), learning_rates=m["lr"],
            gradient_norm=json_number(m["grad_norm"]), step_seconds=m["step_seconds"],
            communication_seconds=m["communication_seconds"], compression_ratio=json_number(m["compression_ratio"]),
            images_per_second=m["images_per_second"], skipped=m["skipped"], wall_time=wall))
    with open(os.path.join(HERE, "tfevents_input.json"), "w") as f:
        json.dump({"file_version_wall_time": T0, "steps": steps}, f, indent=1)
        f.write("\n")
    shutil.rmtree(logdir)
    print(f"{len(events)} records, {os.path.getsize(os.path.join(HERE, 'tfevents_golden.bin'))} bytes")


if __name__ == "__main__":
    main()
