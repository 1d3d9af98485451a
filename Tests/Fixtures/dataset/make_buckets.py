#!/usr/bin/env python3
"""Golden table for Sources/Dataset/Buckets.swift (Tests/DatasetTests/BucketTests.swift).

Every function below is copied from kohya-ss/sd-scripts at commit
48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16):
  - make_bucket_resolutions                  library/model_util.py
  - BucketManager.__init__ asserts, round_to_steps, select_bucket, get_crop_ltrb   library/train_util.py
  - BaseDataset.adjust_min_max_bucket_reso_by_steps                               library/train_util.py
  - trim_and_resize_if_required (its size arithmetic only: no pixels)             library/train_util.py
  - the SDXL conditioning from BaseDataset.__getitem__ (original_sizes_hw, crop_top_lefts, target_sizes_hw)
Only logging was removed and the image array replaced by its size. Run: python3 make_buckets.py > buckets.json
"""
import json
import math
import random

import numpy as np


# library/model_util.py
def make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    max_width, max_height = max_reso
    max_area = max_width * max_height

    resos = set()

    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))

    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible

    resos = list(resos)
    resos.sort()
    return resos


# library/train_util.py BaseDataset.adjust_min_max_bucket_reso_by_steps
def adjust_min_max_bucket_reso_by_steps(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps):
    if min_bucket_reso % bucket_reso_steps != 0:
        min_bucket_reso = min_bucket_reso - min_bucket_reso % bucket_reso_steps
    if max_bucket_reso % bucket_reso_steps != 0:
        max_bucket_reso = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
    assert min(resolution) >= min_bucket_reso
    assert max(resolution) <= max_bucket_reso
    return min_bucket_reso, max_bucket_reso


# library/train_util.py BucketManager (the parts that choose a bucket)
class BucketManager:
    def __init__(self, no_upscale, max_reso, min_size, max_size, reso_steps) -> None:
        if max_size is not None:
            if max_reso is not None:
                assert max_size >= max_reso[0], "the max_size should be larger than the width of max_reso"
                assert max_size >= max_reso[1], "the max_size should be larger than the height of max_reso"
            if min_size is not None:
                assert max_size >= min_size, "the max_size should be larger than the min_size"
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        self.resos = []
        self.reso_to_id = {}
        self.buckets = []

    def make_buckets(self):
        resos = make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps)
        self.set_predefined_resos(resos)

    def set_predefined_resos(self, resos):
        self.predefined_resos = resos.copy()
        self.predefined_resos_set = set(resos)
        self.predefined_aspect_ratios = np.array([w / h for w, h in resos])

    def round_to_steps(self, x):
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width, image_height):
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso in self.predefined_resos_set:
                pass
            else:
                ar_errors = self.predefined_aspect_ratios - aspect_ratio
                predefined_bucket_id = np.abs(ar_errors).argmin()
                reso = self.predefined_resos[predefined_bucket_id]

            ar_reso = reso[0] / reso[1]
            if aspect_ratio > ar_reso:
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width

            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect_ratio)
                resized_height = self.max_area / resized_width
                assert abs(resized_width / resized_height - aspect_ratio) < 1e-2, "aspect is illegal"

                b_width_rounded = self.round_to_steps(resized_width)
                b_height_in_wr = self.round_to_steps(b_width_rounded / aspect_ratio)
                ar_width_rounded = b_width_rounded / b_height_in_wr

                b_height_rounded = self.round_to_steps(resized_height)
                b_width_in_hr = self.round_to_steps(b_height_rounded * aspect_ratio)
                ar_height_rounded = b_width_in_hr / b_height_rounded

                if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                    resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
                else:
                    resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
            else:
                resized_size = (image_width, image_height)

            bucket_width = resized_size[0] - resized_size[0] % self.reso_steps
            bucket_height = resized_size[1] - resized_size[1] % self.reso_steps
            reso = (bucket_width, bucket_height)

        ar_error = (reso[0] / reso[1]) - aspect_ratio
        return reso, resized_size, ar_error

    @staticmethod
    def get_crop_ltrb(bucket_reso, image_size):
        bucket_ar = bucket_reso[0] / bucket_reso[1]
        image_ar = image_size[0] / image_size[1]
        if bucket_ar > image_ar:
            resized_width = bucket_reso[1] * image_ar
            resized_height = bucket_reso[1]
        else:
            resized_width = bucket_reso[0]
            resized_height = bucket_reso[0] / image_ar
        crop_left = (bucket_reso[0] - resized_width) // 2
        crop_top = (bucket_reso[1] - resized_height) // 2
        crop_right = crop_left + resized_width
        crop_bottom = crop_top + resized_height
        return crop_left, crop_top, crop_right, crop_bottom


# library/train_util.py trim_and_resize_if_required, sizes only (random_crop=False: centre trim)
def trim_and_resize_sizes(image_size, reso, resized_size):
    image_width, image_height = image_size
    original_size = (image_width, image_height)
    image_width, image_height = resized_size
    left = top = 0
    if image_width > reso[0]:
        trim_size = image_width - reso[0]
        left = trim_size // 2
        image_width = reso[0]
    if image_height > reso[1]:
        trim_size = image_height - reso[1]
        top = trim_size // 2
        image_height = reso[1]
    crop_ltrb = BucketManager.get_crop_ltrb(reso, original_size)
    assert image_height == reso[1] and image_width == reso[0], "internal error, illegal trimmed size"
    return original_size, (left, top), crop_ltrb


def case(manager, w, h):
    try:
        reso, resized, ar_error = manager.select_bucket(w, h)
    except ZeroDivisionError:
        return None
    if reso[0] <= 0 or reso[1] <= 0:
        return None  # kohya: a zero-sized bucket (image narrower than one step with no_upscale)
    original_size, (left, top), crop_ltrb = trim_and_resize_sizes((w, h), reso, resized)
    target_size = reso  # the trimmed image is the bucket's size
    # BaseDataset.__getitem__: SDXL size conditioning, unflipped and flipped
    cond = {}
    for flipped in (False, True):
        if not flipped:
            crop_left_top = (crop_ltrb[0], crop_ltrb[1])
        else:
            crop_left_top = (target_size[0] - crop_ltrb[2], crop_ltrb[1])
        cond["flipped" if flipped else "plain"] = {
            "original_hw": [int(original_size[1]), int(original_size[0])],
            "crop_top_left": [int(crop_left_top[1]), int(crop_left_top[0])],
            "target_hw": [int(target_size[1]), int(target_size[0])],
        }
    # one compact row per case (the table is committed): see ROW_FIELDS; floats as exact hex strings
    return [reso[0], reso[1], resized[0], resized[1], left, top] + [float(x).hex() for x in crop_ltrb] + [ar_error.hex()] \
        + cond["plain"]["original_hw"] + cond["plain"]["crop_top_left"] + cond["plain"]["target_hw"] \
        + cond["flipped"]["crop_top_left"]


ROW_FIELDS = ["bucket_w", "bucket_h", "resized_w", "resized_h", "crop_left", "crop_top",
              "ltrb_left", "ltrb_top", "ltrb_right", "ltrb_bottom", "ar_error",
              "original_h", "original_w", "cond_crop_top", "cond_crop_left", "target_h", "target_w",
              "flipped_cond_crop_top", "flipped_cond_crop_left"]


def main():
    rng = random.Random(20260217)
    sizes = [(rng.randint(64, 4000), rng.randint(64, 4000)) for _ in range(120)]
    sizes += [(64, 64), (256, 256), (512, 512), (1000, 1000), (1024, 1024), (4000, 4000),
              (256, 1024), (1024, 256), (512, 2048), (2048, 512), (100, 400), (400, 100),
              (32, 32), (1, 1), (8, 300), (63, 700), (700, 63), (65, 65), (127, 129),
              (832, 1216), (1216, 832), (768, 1344), (640, 1536), (576, 448), (1024, 1023),
              (3000, 2000), (2000, 3000), (1920, 1080), (1080, 1920), (64, 4000), (4000, 64)]
    configs = [
        {"resolution": [512, 512], "min": 256, "max": 1024, "step": 64},
        {"resolution": [768, 768], "min": 256, "max": 1024, "step": 64},
        {"resolution": [1024, 1024], "min": 256, "max": 1024, "step": 64},
        {"resolution": [512, 512], "min": 256, "max": 2048, "step": 64},
        {"resolution": [768, 768], "min": 256, "max": 2048, "step": 64},
        {"resolution": [1024, 1024], "min": 256, "max": 2048, "step": 64},
        {"resolution": [768, 1024], "min": 256, "max": 1024, "step": 64},
        {"resolution": [1024, 1024], "min": 512, "max": 2048, "step": 32},
        {"resolution": [1000, 1000], "min": 300, "max": 1000, "step": 64},  # kohya rounds min down, max up
    ]
    out = []
    for c in configs:
        res = tuple(c["resolution"])
        mn, mx = adjust_min_max_bucket_reso_by_steps(res, c["min"], c["max"], c["step"])
        entry = {"config": c, "adjusted_min": mn, "adjusted_max": mx,
                 "resolutions": [list(r) for r in make_bucket_resolutions(res, mn, mx, c["step"])], "cases": []}
        for no_upscale in (False, True):
            m = BucketManager(no_upscale, res, mn, mx, c["step"])
            if not no_upscale:
                m.make_buckets()
            for w, h in sizes:
                entry["cases"].append([w, h, int(no_upscale), case(m, w, h)])
        out.append(entry)
    print(json.dumps({"kohya_commit": "48d368fa557731ad0488c07304dfeba8c07910eb", "row_fields": ROW_FIELDS,
                      "configs": out}, separators=(",", ":")))


if __name__ == "__main__":
    main()
