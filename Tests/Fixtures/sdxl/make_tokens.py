"""Golden token ids for the SDXL CLIP tokenizers (Sources/SDXL/Tokenizer.swift), and the generated text tables
that tokenizer's ftfy port uses (Sources/SDXL/TokenizerTextTables.swift).

Reference: transformers' *python* CLIPTokenizer (the class that calls ftfy.fix_text), as kohya's sd-scripts runs it
(requirements.txt pins transformers==4.54.1, ftfy==6.3.1). transformers 5 replaced that class with a
tokenizers-backed one that never calls ftfy, so run this with the pinned version on the path:

    pip install --target /tmp/tf454 --no-deps "transformers==4.54.1" "tokenizers>=0.21,<0.22" "huggingface-hub==0.34.3"
    pip install ftfy==6.3.1 open_clip_torch regex
    PYTHONPATH=/tmp/tf454 python3 Tests/Fixtures/sdxl/make_tokens.py

Vocabulary: built from open_clip's bpe_simple_vocab_16e6.txt.gz exactly as openai/clip-vit-large-patch14's
vocab.json / merges.txt are (CLIP's SimpleTokenizer order: the 256 byte symbols in bytes_to_unicode order, the
same + "</w>", each merge's concatenation, <|startoftext|>, <|endoftext|>; merges.txt = "#version: 0.2" + the
48,894 merges). The two SDXL tokenizers:
  tokenizer 1 — openai/clip-vit-large-patch14: pad_token "<|endoftext|>" (49407);
  tokenizer 2 — laion/CLIP-ViT-bigG-14-laion2B-39B-b160k: pad_token "!" (id 0), which kohya re-asserts with
                `tokenizer2.pad_token_id = 0` (library/strategy_sdxl.py SdxlTokenizeStrategy). "!" is then an
                added special token, so transformers splits every "!" of a caption out as id 0 before BPE.

Inputs: captions.txt, one caption per line (an empty line is the empty caption). Escapes in it: \\t, \\n, \\r and
\\u{HEX}; any other backslash is literal (Danbooru's `\\(`).

Outputs:
  tokens_golden.json — per caption: the decoded caption, raw BPE ids (`encode`, no BOS/EOS, untruncated), the
      padded max_length=77 ids of both tokenizers, and kohya's chunked ids (train_util.BaseDataset.get_input_ids)
      for max_token_length 150 and 225 (tokenizer_max_length 152 / 227).
  ../../../Sources/SDXL/TokenizerTextTables.swift — ftfy's HTML entity table (chardata.HTML_ENTITIES, from Python's
      html.entities.html5) and width map (chardata.WIDTH_MAP), which come from Python's Unicode/HTML data.
"""
import gzip
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile

import ftfy
import ftfy.chardata
import torch
import transformers
from transformers import CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", "..", ".."))


def bytes_to_unicode():
    """CLIP's byte → printable-unicode map (open_clip/tokenizer.py, transformers tokenization_clip.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab_files(folder):
    """vocab.json + merges.txt as openai/clip-vit-large-patch14 ships them, from open_clip's merges file."""
    # open_clip's package folder, found without importing it (its __init__ pulls in torchvision).
    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    path = os.path.join(package, "bpe_simple_vocab_16e6.txt.gz")
    merge_lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    assert len(merge_lines) == 48894
    bundled = open(os.path.join(REPO, "Sources/SDXL/Resources/clip_bpe_merges.txt"), encoding="utf-8").read()
    assert bundled.split("\n")[:48894] == merge_lines, "Sources/SDXL/Resources/clip_bpe_merges.txt differs from open_clip"
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merge_lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merge_lines) + "\n")


def get_input_ids(tokenizer, caption, tokenizer_max_length):
    """kohya-ss/sd-scripts library/train_util.py BaseDataset.get_input_ids (same code as strategy_base.py
    TokenizeStrategy._get_input_ids), verbatim apart from `self.`."""
    input_ids = tokenizer(
        caption, padding="max_length", truncation=True, max_length=tokenizer_max_length, return_tensors="pt"
    ).input_ids

    if tokenizer_max_length > tokenizer.model_max_length:
        input_ids = input_ids.squeeze(0)
        iids_list = []
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            for i in range(1, tokenizer_max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (
                    input_ids[0].unsqueeze(0),
                    input_ids[i : i + tokenizer.model_max_length - 2],
                    input_ids[-1].unsqueeze(0),
                )
                ids_chunk = torch.cat(ids_chunk)
                iids_list.append(ids_chunk)
        else:
            for i in range(1, tokenizer_max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (
                    input_ids[0].unsqueeze(0),
                    input_ids[i : i + tokenizer.model_max_length - 2],
                    input_ids[-1].unsqueeze(0),
                )
                ids_chunk = torch.cat(ids_chunk)
                if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                    ids_chunk[-1] = tokenizer.eos_token_id
                if ids_chunk[1] == tokenizer.pad_token_id:
                    ids_chunk[1] = tokenizer.eos_token_id
                iids_list.append(ids_chunk)
        input_ids = torch.stack(iids_list)
    return input_ids


def read_captions():
    text = open(os.path.join(HERE, "captions.txt"), encoding="utf-8").read()
    assert text.endswith("\n")
    escapes = {"t": "\t", "n": "\n", "r": "\r"}

    def unescape(line):
        line = re.sub(r"\\u\{([0-9A-Fa-f]+)\}", lambda m: chr(int(m.group(1), 16)), line)
        return re.sub(r"\\([tnr])", lambda m: escapes[m.group(1)], line)

    return [unescape(line) for line in text[:-1].split("\n")]


def swift_string_literal(s):
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%X}" % ord(ch))
    return '"' + "".join(out) + '"'


def write_swift_tables():
    entities = ftfy.chardata.HTML_ENTITIES
    width = ftfy.chardata.WIDTH_MAP
    # "name value" lines: the entity without "&" and ";" (all names are [0-9A-Za-z]+), the value as hex scalars.
    entity_lines = []
    for name in sorted(entities):
        assert name.startswith("&") and name.endswith(";") and re.fullmatch(r"[0-9A-Za-z]+", name[1:-1]), name
        entity_lines.append(name[1:-1] + " " + " ".join("%X" % ord(c) for c in entities[name]))
    width_lines = ["%X %s" % (k, " ".join("%X" % ord(c) for c in v)) for k, v in sorted(width.items())]
    src = [
        "// GENERATED by Tests/Fixtures/sdxl/make_tokens.py from ftfy %s (Python %s) — do not edit." % (
            ftfy.__version__, sys.version.split()[0]),
        "// The tables behind ftfy's unescape_html (chardata.HTML_ENTITIES: Python's html.entities.html5 names that",
        "// end in ';', plus the upper-cased names ftfy also decodes) and fix_character_width (chardata.WIDTH_MAP:",
        "// U+3000 and each of U+FF01...U+FFEF whose NFKC form differs). One entry per line: key, then the",
        "// replacement's scalars in hex. Parsed once, on first use, by Tokenizer.swift's FTFY.",
        "",
        "enum TokenizerTextTables {",
        "    /// %d entries: `name HEX...` (the entity is `&name;`)." % len(entity_lines),
        '    static let htmlEntities = """',
    ]
    src += ["        " + line for line in entity_lines]
    src += [
        '        """',
        "",
        "    /// %d entries: `HEX HEX...` (scalar → replacement scalars)." % len(width_lines),
        '    static let widthMap = """',
    ]
    src += ["        " + line for line in width_lines]
    src += ['        """', "}", ""]
    with open(os.path.join(REPO, "Sources/SDXL/TokenizerTextTables.swift"), "w", encoding="utf-8") as f:
        f.write("\n".join(src))


def main():
    assert transformers.__version__.startswith("4."), (
        "needs transformers 4.x, whose CLIPTokenizer calls ftfy (see the docstring)")
    folder = tempfile.mkdtemp()
    write_vocab_files(folder)
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    tok1 = CLIPTokenizer(vocab, merges, model_max_length=77)
    tok2 = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
    tok2.pad_token_id = 0  # kohya: strategy_sdxl.SdxlTokenizeStrategy ("use 0 as pad token for tokenizer2")
    for t in (tok1, tok2):
        assert type(t).__mro__[1].__name__ == "PreTrainedTokenizer", "the python (slow) CLIPTokenizer is required"
        assert t.fix_text is not None, "ftfy must be installed: transformers' CLIPTokenizer then uses ftfy.fix_text"
        assert t.bos_token_id == 49406 and t.eos_token_id == 49407
    assert tok1.pad_token_id == 49407 and tok2.pad_token_id == 0 and tok2.pad_token == "!"

    cases = []
    for caption in read_captions():
        case = {"caption": caption}
        for name, tok in (("1", tok1), ("2", tok2)):
            case["encode" + name] = tok.encode(caption, add_special_tokens=False)
            case["ids" + name] = tok(caption, padding="max_length", truncation=True, max_length=77).input_ids
            for max_token_length in (150, 225):
                chunks = get_input_ids(tok, caption, max_token_length + 2)
                case["chunks%s_%d" % (name, max_token_length)] = chunks.tolist()
            # kohya with max_token_length unset: tokenizer_max_length = 77, one [1, 77] row.
            assert get_input_ids(tok, caption, 77).tolist() == [case["ids" + name]]
        cases.append(case)

    golden = {
        "generator": "Tests/Fixtures/sdxl/make_tokens.py",
        "transformers": transformers.__version__,
        "ftfy": ftfy.__version__,
        "open_clip": importlib.metadata.version("open_clip_torch"),
        "tokenizer1": {"pad_token": tok1.pad_token, "pad_token_id": tok1.pad_token_id},
        "tokenizer2": {"pad_token": tok2.pad_token, "pad_token_id": tok2.pad_token_id},
        "cases": cases,
    }
    with open(os.path.join(HERE, "tokens_golden.json"), "w", encoding="utf-8") as f:
        # One case per line: small diffs when the caption list changes.
        f.write("{\n")
        for k, v in golden.items():
            if k != "cases":
                f.write("%s: %s,\n" % (json.dumps(k), json.dumps(v, ensure_ascii=False)))
        f.write('"cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases))
        f.write("\n]\n}\n")
    write_swift_tables()
    lengths = [len(c["encode1"]) for c in cases]
    print("%d captions, BPE lengths %s; ftfy %s, transformers %s" % (
        len(cases), lengths, ftfy.__version__, transformers.__version__))


if __name__ == "__main__":
    main()
