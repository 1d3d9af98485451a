#!/usr/bin/env python3
"""Golden table for Tests/DatasetTests/CaptionTests.swift (Sources/Dataset/Captions.swift).

Runs kohya's own caption code, copied verbatim below from kohya-ss/sd-scripts library/train_util.py at commit
48d368fa557731ad0488c07304dfeba8c07910eb (BaseDataset.process_caption, BaseDataset.set_tag_frequency, and the
reading part of DreamBoothDataset.__init__.read_caption), and AI Toolkit's inject_trigger_into_prompt from
ostris/ai-toolkit toolkit/prompt_utils.py at commit 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350.

Python's global `random` is replaced by ScriptedRandom, a counter-driven source whose draws the Swift test
reproduces exactly (same formulas); shuffle/choice are CPython's own algorithms on top of _randbelow. So the
random parts (dropout draws, shuffle, tag dropout, wildcard choice) are compared too, not only the
deterministic ones. Run: python3 make_captions.py  (writes captions.json next to this file).
"""
import base64
import json
import math
import os
import re
import tempfile
from types import SimpleNamespace


class ScriptedRandom:
    """random(): frac((k + 1) * 0.6180339887498949); _randbelow(n): (k * 7919 + 13) % n; k counts every call."""

    def __init__(self):
        self.k = 0
        self.draws = []

    def random(self):
        v = ((self.k + 1) * 0.6180339887498949) % 1.0
        self.k += 1
        self.draws.append(v)
        return v

    def _randbelow(self, n):
        v = (self.k * 7919 + 13) % n
        self.k += 1
        return v

    # CPython Lib/random.py Random.shuffle / Random.choice (3.11)
    def shuffle(self, x):
        randbelow = self._randbelow
        for i in reversed(range(1, len(x))):
            j = randbelow(i + 1)
            x[i], x[j] = x[j], x[i]

    def choice(self, seq):
        if not len(seq):
            raise IndexError("Cannot choose from an empty sequence")
        return seq[self._randbelow(len(seq))]


random = ScriptedRandom()
BaseSubset = SimpleNamespace  # annotation used by the verbatim process_caption


class BaseDataset:
    def __init__(self, epoch):
        self.current_epoch = epoch
        self.current_step = 0
        self.max_train_steps = 1000
        self.replacements = {}
        self.tag_frequency = {}

    # ---- verbatim: library/train_util.py BaseDataset.set_tag_frequency ----
    def set_tag_frequency(self, dir_name, captions):
        frequency_for_dir = self.tag_frequency.get(dir_name, {})
        self.tag_frequency[dir_name] = frequency_for_dir
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip()
                if tag:
                    tag = tag.lower()
                    frequency = frequency_for_dir.get(tag, 0)
                    frequency_for_dir[tag] = frequency + 1


    # ---- verbatim: library/train_util.py BaseDataset.process_caption ----
    def process_caption(self, subset: BaseSubset, caption):
        # caption に prefix/suffix を付ける
        if subset.caption_prefix:
            caption = subset.caption_prefix + " " + caption
        if subset.caption_suffix:
            caption = caption + " " + subset.caption_suffix

        # dropoutの決定：tag dropがこのメソッド内にあるのでここで行うのが良い
        is_drop_out = subset.caption_dropout_rate > 0 and random.random() < subset.caption_dropout_rate
        is_drop_out = (
            is_drop_out
            or subset.caption_dropout_every_n_epochs > 0
            and self.current_epoch % subset.caption_dropout_every_n_epochs == 0
        )

        if is_drop_out:
            caption = ""
        else:
            # process wildcards
            if subset.enable_wildcard:
                # if caption is multiline, random choice one line
                if "\n" in caption:
                    caption = random.choice(caption.split("\n"))

                # wildcard is like '{aaa|bbb|ccc...}'
                # escape the curly braces like {{ or }}
                replacer1 = "⦅"
                replacer2 = "⦆"
                while replacer1 in caption or replacer2 in caption:
                    replacer1 += "⦅"
                    replacer2 += "⦆"

                caption = caption.replace("{{", replacer1).replace("}}", replacer2)

                # replace the wildcard
                def replace_wildcard(match):
                    return random.choice(match.group(1).split("|"))

                caption = re.sub(r"\{([^}]+)\}", replace_wildcard, caption)

                # unescape the curly braces
                caption = caption.replace(replacer1, "{").replace(replacer2, "}")
            else:
                # if caption is multiline, use the first line
                caption = caption.split("\n")[0]

            if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
                fixed_tokens = []
                flex_tokens = []
                fixed_suffix_tokens = []
                if (
                    hasattr(subset, "keep_tokens_separator")
                    and subset.keep_tokens_separator
                    and subset.keep_tokens_separator in caption
                ):
                    fixed_part, flex_part = caption.split(subset.keep_tokens_separator, 1)
                    if subset.keep_tokens_separator in flex_part:
                        flex_part, fixed_suffix_part = flex_part.split(subset.keep_tokens_separator, 1)
                        fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(subset.caption_separator) if t.strip()]

                    fixed_tokens = [t.strip() for t in fixed_part.split(subset.caption_separator) if t.strip()]
                    flex_tokens = [t.strip() for t in flex_part.split(subset.caption_separator) if t.strip()]
                else:
                    tokens = [t.strip() for t in caption.strip().split(subset.caption_separator)]
                    flex_tokens = tokens[:]
                    if subset.keep_tokens > 0:
                        fixed_tokens = flex_tokens[: subset.keep_tokens]
                        flex_tokens = tokens[subset.keep_tokens :]

                if subset.token_warmup_step < 1:  # 初回に上書きする
                    subset.token_warmup_step = math.floor(subset.token_warmup_step * self.max_train_steps)
                if subset.token_warmup_step and self.current_step < subset.token_warmup_step:
                    tokens_len = (
                        math.floor(
                            (self.current_step) * ((len(flex_tokens) - subset.token_warmup_min) / (subset.token_warmup_step))
                        )
                        + subset.token_warmup_min
                    )
                    flex_tokens = flex_tokens[:tokens_len]

                def dropout_tags(tokens):
                    if subset.caption_tag_dropout_rate <= 0:
                        return tokens
                    l = []
                    for token in tokens:
                        if random.random() >= subset.caption_tag_dropout_rate:
                            l.append(token)
                    return l

                if subset.shuffle_caption:
                    random.shuffle(flex_tokens)

                flex_tokens = dropout_tags(flex_tokens)

                caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)

            # process secondary separator
            if subset.secondary_separator:
                caption = caption.replace(subset.secondary_separator, subset.caption_separator)

            # textual inversion対応
            for str_from, str_to in self.replacements.items():
                if str_from == "":
                    # replace all
                    if type(str_to) == list:
                        caption = random.choice(str_to)
                    else:
                        caption = str_to
                else:
                    caption = caption.replace(str_from, str_to)

        return caption


# ---- verbatim: ai-toolkit toolkit/prompt_utils.py inject_trigger_into_prompt ----
def inject_trigger_into_prompt(prompt, trigger=None, to_replace_list=None, add_if_not_present=True):
    if trigger is None:
        # process as empty string to remove any [trigger] tokens
        trigger = ''
    output_prompt = prompt
    default_replacements = ["[name]", "[trigger]"]

    replace_with = trigger
    if to_replace_list is None:
        to_replace_list = default_replacements
    else:
        to_replace_list += default_replacements

    # remove duplicates
    to_replace_list = list(set(to_replace_list))

    # replace them all
    for to_replace in to_replace_list:
        # replace it
        output_prompt = output_prompt.replace(to_replace, replace_with)

    if trigger.strip() != "":
        # see how many times replace_with is in the prompt
        num_instances = output_prompt.count(replace_with)

        if num_instances == 0 and add_if_not_present:
            # add it to the beginning of the prompt
            output_prompt = replace_with + " " + output_prompt

    return output_prompt


# ---- reading: the body of DreamBoothDataset.__init__.read_caption after the file is found (verbatim) ----
def read_caption_file(cap_path, enable_wildcard):
    with open(cap_path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
        assert len(lines) > 0
        if enable_wildcard:
            caption = "\n".join([line.strip() for line in lines if line.strip() != ""])
        else:
            caption = lines[0].strip()
    return caption


OPTION_KEYS = {  # Swift CaptionOptions key -> kohya subset attribute
    "shuffle": "shuffle_caption", "keepTokens": "keep_tokens", "keepTokensSeparator": "keep_tokens_separator",
    "captionSeparator": "caption_separator", "secondarySeparator": "secondary_separator",
    "enableWildcard": "enable_wildcard", "captionDropoutRate": "caption_dropout_rate",
    "tagDropoutRate": "caption_tag_dropout_rate", "dropoutEveryNEpochs": "caption_dropout_every_n_epochs",
    "prefix": "caption_prefix", "suffix": "caption_suffix",
}
DEFAULTS = dict(shuffle_caption=False, keep_tokens=0, keep_tokens_separator="", caption_separator=",",
                secondary_separator=None, enable_wildcard=False, caption_dropout_rate=0.0,
                caption_tag_dropout_rate=0.0, caption_dropout_every_n_epochs=0, caption_prefix=None,
                caption_suffix=None, token_warmup_step=0, token_warmup_min=1)


def pipeline(caption, opts, epoch):
    """kohya process_caption, then AI Toolkit's trigger (which it skips for a dropped caption)."""
    global random
    random = ScriptedRandom()
    attrs = dict(DEFAULTS)
    for k, v in opts.items():
        if k != "trigger":
            attrs[OPTION_KEYS[k]] = v
    subset = SimpleNamespace(**attrs)
    out = BaseDataset(epoch).process_caption(subset, caption)
    rate, n = subset.caption_dropout_rate, subset.caption_dropout_every_n_epochs
    dropped = (rate > 0 and random.draws[0] < rate) or (n > 0 and epoch % n == 0)
    if not dropped and opts.get("trigger") is not None:
        out = inject_trigger_into_prompt(out, opts["trigger"])
    return out


CASES = [
    # (caption, options, epoch)
    ("1girl, solo, red hair", {}, 1),
    ("  1girl , solo,red hair  ", {"prefix": "masterpiece", "suffix": "best quality"}, 1),
    ("a,,b, ,c", {"shuffle": True}, 1),
    ("a,,b, ,c", {"keepTokens": 2, "tagDropoutRate": 0.3}, 1),
    ("sks dog, sitting, grass, sky, tree", {"shuffle": True, "keepTokens": 1}, 1),
    ("sks dog, sitting, grass, sky, tree", {"shuffle": True, "keepTokens": 2}, 2),
    ("sks dog, sitting, grass, sky, tree", {"shuffle": True, "keepTokens": 9}, 3),
    ("sks dog, sitting, grass, sky, tree", {"shuffle": True, "keepTokens": 1, "tagDropoutRate": 0.5}, 4),
    ("sks dog, sitting, grass, sky, tree", {"tagDropoutRate": 0.99}, 1),
    ("sks, style ||| a, b, c, d ||| quality, hi", {"shuffle": True, "keepTokensSeparator": "|||"}, 1),
    ("sks, style ||| a, b, c, d", {"shuffle": True, "keepTokensSeparator": "|||", "keepTokens": 3}, 1),
    ("a, b, c", {"shuffle": True, "keepTokensSeparator": "|||", "keepTokens": 1}, 1),
    ("x |||  ||| y", {"shuffle": True, "keepTokensSeparator": "|||"}, 1),
    ("a ||| b ||| c ||| d", {"tagDropoutRate": 0.2, "keepTokensSeparator": "|||"}, 1),
    ("a ||| b", {"keepTokensSeparator": "|||"}, 1),
    ("a;b;c, d;e, f", {"shuffle": True, "secondarySeparator": ";"}, 1),
    ("a;;;b, c;;;d, e", {"shuffle": True, "secondarySeparator": ";;;", "keepTokens": 1}, 2),
    ("a;;;b, c", {"secondarySeparator": ";;;"}, 1),
    ("a. b. c. d", {"shuffle": True, "captionSeparator": "."}, 1),
    ("a. b. c. d", {"shuffle": True, "captionSeparator": ". ", "keepTokens": 1}, 1),
    ("cat, sofa", {"captionDropoutRate": 0.5}, 1),
    ("cat, sofa", {"captionDropoutRate": 0.7, "prefix": "p"}, 1),
    ("cat, sofa", {"captionDropoutRate": 0.1}, 1),
    ("cat, sofa", {"dropoutEveryNEpochs": 3}, 3),
    ("cat, sofa", {"dropoutEveryNEpochs": 3}, 4),
    ("cat, sofa", {"dropoutEveryNEpochs": 3, "trigger": "ohwx"}, 6),
    ("cat, sofa", {"trigger": "ohwx"}, 1),
    ("ohwx cat, sofa", {"trigger": "ohwx"}, 1),
    ("photo of [trigger], sofa, [name]", {"trigger": "ohwx"}, 1),
    ("photo of [trigger], sofa", {"trigger": ""}, 1),
    ("photo of [trigger], sofa", {"trigger": "  "}, 1),
    ("cat, sofa, rug, lamp", {"trigger": "ohwx", "shuffle": True, "keepTokens": 1}, 1),
    ("cat, sofa, rug, lamp", {"trigger": "ohwx", "tagDropoutRate": 0.99}, 1),
    ("", {"trigger": "ohwx"}, 1),
    ("", {"prefix": "pre", "suffix": "suf"}, 1),
    ("a, b\nsecond line, c", {"shuffle": True}, 1),
    ("a, b\nsecond line, c", {"prefix": "P"}, 1),
    ("line one\nline two\nline three", {"enableWildcard": True}, 1),
    ("a {red|green|blue} {cat|dog}, {{literal}}, {} {x}", {"enableWildcard": True}, 1),
    ("{a|b}, {c|d}, {e|f|g}, h", {"enableWildcard": True, "shuffle": True, "keepTokens": 1}, 2),
    ("⦅x⦆ {{a}} {p|q}", {"enableWildcard": True}, 1),
    ("{open, b", {"enableWildcard": True}, 1),
    ("日本語, 猫,\u3000犬\u3000, e\u0301, x\x1f", {"shuffle": True}, 1),
    ("tag1, tag2, tag3, tag4, tag5, tag6, tag7, tag8", {"shuffle": True, "keepTokens": 2, "tagDropoutRate": 0.4,
      "prefix": "pre", "suffix": "suf", "secondarySeparator": "+", "trigger": "zz"}, 5),
]

FILES = [
    # (raw bytes, enable_wildcard)
    (b"1girl, solo\nsecond line\n", False),
    (b"  spaced, tags \t\r\nnext", False),
    (b"cr only\rnext\r", False),
    (b"\n\nafter blanks\n  \nlast ", True),
    ("日本語, 猫\u3000\n".encode("utf-8"), False),
    (b"no newline at end", False),
    (b"a\r\n\r\nb\r\n", True),
]

TAG_SETS = [
    ["1girl, solo, Red Hair", "1girl,  ,solo,", "RED HAIR, \u00c4pfel, \u00e4pfel"],
    ["a,b,,c", " a , B ", "", "x\u3000, y"],
]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    cases = [{"caption": c, "options": o, "epoch": e, "expected": pipeline(c, o, e)} for c, o, e in CASES]
    files = []
    with tempfile.TemporaryDirectory() as d:
        for i, (raw, wild) in enumerate(FILES):
            p = os.path.join(d, f"{i}.txt")
            with open(p, "wb") as f:
                f.write(raw)
            files.append({"bytes": base64.b64encode(raw).decode(), "enableWildcard": wild,
                          "expected": read_caption_file(p, wild)})
    tags = []
    for captions in TAG_SETS:
        ds = BaseDataset(1)
        ds.set_tag_frequency("dir", captions)
        tags.append({"captions": captions, "expected": ds.tag_frequency["dir"]})
    out = {"scripted": {"random": "frac((k + 1) * 0.6180339887498949)", "randbelow": "(k * 7919 + 13) % n"},
           "process": cases, "files": files, "tagFrequency": tags}
    with open(os.path.join(here, "captions.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
