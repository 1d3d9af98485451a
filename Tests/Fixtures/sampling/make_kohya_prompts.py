"""kohya sd-scripts' own sample-prompt code on a table of inputs (Tests/TrainingTests/SamplePromptTests.swift).

Needs a checkout of kohya-ss/sd-scripts (made with 48d368fa557731ad0488c07304dfeba8c07910eb, 2026-02-16) and its pinned
transformers 4.54.1 + PyTorch; from the repository root:

    python3 Tests/Fixtures/sampling/make_kohya_prompts.py --sd-scripts /path/to/sd-scripts

The functions are taken out of kohya's files with `ast` and executed as they are (no kohya module is imported, so
torchvision/accelerate are not needed):
  library/train_util.py        line_to_prompt_dict, load_prompts
  library/strategy_base.py     class TokenizeStrategy (its _get_weighted_input_ids holds the live copy of
                               parse_prompt_attention and the weighted tokenisation; _get_input_ids the chunking)
  library/strategy_sdxl.py     SdxlTokenizeStrategy.tokenize_with_weights (max_length = max_token_length + 2, or 77)
The CLIP tokenizers are transformers' CLIPTokenizer on the vocabulary lora-dist bundles (make_tokens.write_vocab_files);
tokenizer 2 pads with 0 as SdxlTokenizeStrategy sets it.

Writes kohya_prompts.json:
  attention: [[text, [[piece, weight], ...]] or [text, "error"]]   parse_prompt_attention
  lines:     [[line, prompt_dict]]                                   line_to_prompt_dict
  files:     {file name: [prompt_dict, ...] or "error: ..."}         load_prompts on Tests/Fixtures/sampling/prompt_files/*
  weighted:  [[text, max_token_length or null, ids1, weights1, ids2, weights2]]   tokenize_with_weights, [n, 77] each
"""

import argparse
import ast
import json
import logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import toml
import torch
from transformers import CLIPTokenizer, CLIPTextModel, CLIPTextModelWithProjection

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sdxl"))
import make_tokens  # noqa: E402

ATTENTION = ["normal text", "an (important) word", "(unbalanced", r"\(literal\]", "(unnecessary)(parens)",
             "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "[[a]]", "(a:1.5)", "(a:-0.5) b", "(a:+2)", "(a:.5)",
             "a:b", "(a:b)", "(a: 1.2)", "(a:1.2 )", "(a :1.2)", "a )b] c", r"a \\ b", r"a \ b", r"a \x b", "", "()",
             "(:1.5)", "[a:1.5]", "(a [b] c)", "((a), b)", "(a BREAK b)", "(a:1.2.3)", "x (a:1e3)", "[a", "(a][b)",
             r"\(a:1.2\)", "a (b:0) c", "(a:1.1) b", "(a:5.)", "masterpiece, (best quality:1.2), [[blurry]], 1girl",
             "trailing backslash \\", "日本語 (テスト:1.3)"]

LINES = ["masterpiece, 1girl --n lowres, bad hands --w 1024 --h 768 --d 42 --l 7 --s 28 --ss euler_a", "a cat",
         "a cat --W 832 --H 1216 --D 5 --L 4.5 --S 2000 --SS k_euler", "a cat --s 0", "a cat --w abc --h 512",
         "a cat --l 7.5.1", "a cat --x foo --n  --n bad", "a cat --nsfw, --n bad", "a cat--n bad", "a cat -- n bad",
         "a cat --s 20 --steps 40", "a cat --w 1000.5", "a cat --d -1", " --n bad only", "a cat --l 7 --l 9",
         "a cat --n neg --with dog", "a cat --height 512", "w 512 cat", "n ice cream --n bad", "s 10 cats", "h 1 --w 64",
         "a cat  --n bad  ", "a cat --N Bad --Ss DDIM", "a cat --l .5", "a cat --w 0 --h 7", "a cat --s 30abc",
         "(a:1.2) --n (ugly:1.3), [blurry]", "a cat ---n bad", "a cat --n bad --n worse", "a cat --g 3.5 --l 5",
         "a cat --d 4294967297", "a cat --l 7.", "日本語の猫 --n 悪い --d 3"]

WEIGHTED = ["a photo of a cat", "", "a (red:1.5) cat, [blurry]", "(masterpiece)s, ((best quality)), (a:0) b",
            ", ".join(["cat"] * 80), "(" + ", ".join(["cat"] * 80) + ":1.2)", " ".join(["cat"] * 75),
            " ".join(["cat"] * 76), " ".join(["dog"] * 150), " ".join(["dog"] * 240)]


def extract(path, names, ns):
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            exec(compile(ast.Module([node], []), path, "exec"), ns)
            found.add(node.name)
    missing = set(names) - found
    assert not missing, f"{path}: {missing} not found (another sd-scripts version?)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd-scripts", required=True)
    root = ap.parse_args().sd_scripts
    logger = logging.getLogger("kohya")
    ns = dict(re=re, json=json, toml=toml, torch=torch, np=np, os=os, logger=logger, List=List, Dict=Dict, Any=Any,
              Optional=Optional, Tuple=Tuple, Union=Union, Callable=Callable, CLIPTokenizer=CLIPTokenizer,
              CLIPTextModel=CLIPTextModel, CLIPTextModelWithProjection=CLIPTextModelWithProjection)
    extract(os.path.join(root, "library/train_util.py"), {"line_to_prompt_dict", "load_prompts"}, ns)
    extract(os.path.join(root, "library/strategy_base.py"), {"TokenizeStrategy"}, ns)
    # load_prompts imports line_to_prompt_dict from library.train_util: give it this one.
    import types
    fake = types.ModuleType("library.train_util")
    fake.line_to_prompt_dict = ns["line_to_prompt_dict"]
    sys.modules.setdefault("library", types.ModuleType("library"))
    sys.modules["library.train_util"] = fake

    folder = tempfile.mkdtemp()
    make_tokens.write_vocab_files(folder)
    t1 = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    t2 = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77, pad_token="!")
    t2.pad_token_id = 0

    strategy = ns["TokenizeStrategy"]()

    # The nested parse_prompt_attention of _get_weighted_input_ids, observed through a recording tokenizer: it
    # tokenises each (piece) and gives every token the piece's weight.
    class Recorder:
        model_max_length, bos_token_id, eos_token_id, pad_token_id = 77, 1, 2, 0

        def __init__(self):
            self.words = []

        def __call__(self, word):
            self.words.append(word)
            r = types.SimpleNamespace()
            r.input_ids = [1, 1000 + len(self.words), 2]   # one token per piece, tagged
            return r

    attention = []
    for text in ATTENTION:
        rec = Recorder()
        try:
            _, weights = strategy._get_weighted_input_ids(rec, text, 77)
            attention.append([text, [[w, float(weights[0, 1 + i])] for i, w in enumerate(rec.words)]])
        except ValueError:
            attention.append([text, "error"])

    lines = [[line, ns["line_to_prompt_dict"](line)] for line in LINES]

    files = {}
    pdir = os.path.join(HERE, "prompt_files")
    for name in sorted(os.listdir(pdir)):
        if name.endswith(".md"):
            continue
        try:
            files[name] = ns["load_prompts"](os.path.join(pdir, name))
        except Exception as e:  # kohya's own failure, recorded
            files[name] = f"error: {type(e).__name__}: {e}"

    weighted = []
    for text in WEIGHTED:
        for mtl in (None, 150, 225):
            max_length = 77 if mtl is None else mtl + 2
            row = [text, mtl]
            for tok in (t1, t2):
                ids, w = strategy._get_input_ids(tok, text, max_length, weighted=True)
                ids = ids.reshape(-1, 77)
                w = w.reshape(-1, 77)
                row += [ids.tolist(), [[round(float(x), 7) for x in r] for r in w.tolist()]]
            weighted.append(row)

    out = {"produced_by": "Tests/Fixtures/sampling/make_kohya_prompts.py on kohya-ss/sd-scripts 48d368fa (transformers "
                          f"{__import__('transformers').__version__})",
           "attention": attention, "lines": lines, "files": files, "weighted": weighted}
    path = os.path.join(HERE, "kohya_prompts.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {path}: {len(attention)} attention, {len(lines)} lines, {len(files)} files, {len(weighted)} weighted, "
          f"{os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
