#!/usr/bin/env python3
"""Every argparse argument of kohya's sdxl_train_network.py, read from kohya's source with `ast` (nothing imported).

Source: kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (the commit the Dataset module's
fixtures come from). Run:

    python3 make_kohya_args.py /path/to/sd-scripts > kohya_args.json

The walk starts at `setup_parser()` in sdxl_train_network.py and follows what argparse would run:
`parser.add_argument(...)` calls are recorded; calls to other `add_*`/`setup_parser` functions (`train_network.
setup_parser()`, `train_util.add_training_arguments(parser, True)`, ...) are resolved through the file's imports and
walked with their parameters bound to the call's arguments, so `if support_dreambooth:` branches are taken exactly
as they are at run time. For each argument: its dest name, `type` (the callable's name), `action`, `nargs`,
`choices` and `default` (store_true → false, store_false → true, no default → null, a module constant resolved to
its value). Tests/TrainingTests/TrainingConfigTests.swift reads the JSON: every argument must be implemented,
accepted with a note, or refused by name, and implemented fields must default to kohya's `default`.
"""
import ast
import json
import os
import sys

COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
ROOT = sys.argv[1] if len(sys.argv) > 1 else "."


class Module:
    def __init__(self, dotted):
        self.dotted = dotted
        self.path = os.path.join(ROOT, *dotted.split(".")) + ".py"
        with open(self.path, encoding="utf-8") as f:
            self.tree = ast.parse(f.read(), self.path)
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        self.constants = {}
        for n in self.tree.body:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                try:
                    self.constants[n.targets[0].id] = ast.literal_eval(n.value)
                except ValueError:
                    pass
        # name in this file -> ("module", dotted) or ("function", dotted, name)
        self.names = {}
        package = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        for n in self.tree.body:
            if isinstance(n, ast.Import):
                for a in n.names:
                    self.names[a.asname or a.name.split(".")[0]] = ("module", a.name)
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:  # relative import: from .utils import x
                    base = package + ("." + base if base else "")
                for a in n.names:
                    full = base + "." + a.name
                    if os.path.exists(os.path.join(ROOT, *full.split(".")) + ".py"):
                        self.names[a.asname or a.name] = ("module", full)
                    else:
                        self.names[a.asname or a.name] = ("function", base, a.name)


MODULES = {}


def module(dotted):
    if dotted not in MODULES:
        MODULES[dotted] = Module(dotted)
    return MODULES[dotted]


def resolve_function(mod, func):
    """The (module, FunctionDef) a call's callee names, or None when it is not kohya code."""
    if isinstance(func, ast.Name):
        if func.id in mod.functions:
            return mod, mod.functions[func.id]
        ref = mod.names.get(func.id)
        if ref and ref[0] == "function" and os.path.exists(os.path.join(ROOT, *ref[1].split(".")) + ".py"):
            m = module(ref[1])
            return (m, m.functions[ref[2]]) if ref[2] in m.functions else None
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        ref = mod.names.get(func.value.id)
        if ref and ref[0] == "module" and os.path.exists(os.path.join(ROOT, *ref[1].split(".")) + ".py"):
            m = module(ref[1])
            return (m, m.functions[func.attr]) if func.attr in m.functions else None
    return None


def evaluate(node, env, mod):
    """Just enough Python to decide the `if`s of an add_* function: names bound to literal arguments."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in mod.constants:
            return mod.constants[node.id]
        raise ValueError(f"{mod.path}:{node.lineno}: cannot evaluate name {node.id}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not evaluate(node.operand, env, mod)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -evaluate(node.operand, env, mod)
    if isinstance(node, ast.BoolOp):
        values = [evaluate(v, env, mod) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        a, b = evaluate(node.left, env, mod), evaluate(node.comparators[0], env, mod)
        op = node.ops[0]
        if isinstance(op, ast.Eq):
            return a == b
        if isinstance(op, ast.NotEq):
            return a != b
        if isinstance(op, ast.Is):
            return a is b
        if isinstance(op, ast.IsNot):
            return a is not b
    if isinstance(node, (ast.List, ast.Tuple)):
        return [evaluate(e, env, mod) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return evaluate(node.left, env, mod) + evaluate(node.right, env, mod)
    raise ValueError(f"{mod.path}:{getattr(node, 'lineno', '?')}: cannot evaluate {ast.dump(node)[:120]}")


def type_name(node):
    if node is None:
        return None
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Lambda):
        return "lambda"
    return ast.unparse(node)


ARGS = []


def record(call, env, mod, where):
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    kw = {k.arg: k.value for k in call.keywords}
    long_flags = [f for f in flags if f.startswith("--")]
    dest = evaluate(kw["dest"], env, mod) if "dest" in kw else long_flags[0][2:].replace("-", "_")
    action = evaluate(kw["action"], env, mod) if "action" in kw else None
    if "default" in kw:
        try:
            default = evaluate(kw["default"], env, mod)
        except ValueError:
            default = {"expression": ast.unparse(kw["default"])}
    else:
        default = {"store_true": False, "store_false": True}.get(action)
    choices = None
    if "choices" in kw:
        try:
            choices = evaluate(kw["choices"], env, mod)
        except ValueError:
            choices = {"expression": ast.unparse(kw["choices"])}
    nargs = evaluate(kw["nargs"], env, mod) if "nargs" in kw else None
    ARGS.append({
        "name": dest,
        "flags": flags,
        "type": type_name(kw.get("type")) or ("bool" if action in ("store_true", "store_false") else "str"),
        "action": action,
        "nargs": nargs,
        "choices": choices,
        "default": default,
        "defined_in": f"{os.path.relpath(mod.path, ROOT)}:{call.lineno} ({where})",
    })


def walk(stmts, env, mod, where):
    for st in stmts:
        if isinstance(st, ast.If):
            walk(st.body if evaluate(st.test, env, mod) else st.orelse, env, mod, where)
            continue
        if isinstance(st, (ast.Return,)) and isinstance(st.value, ast.Name):
            continue
        for call in [n for n in ast.walk(st) if isinstance(n, ast.Call)]:
            f = call.func
            if isinstance(f, ast.Attribute) and f.attr == "add_argument":
                record(call, env, mod, where)
                continue
            target = resolve_function(mod, f)
            if target is None:
                continue
            m, fd = target
            if not (fd.name.startswith("add_") or fd.name == "setup_parser"):
                continue
            # Bind the callee's parameters: positional, keywords, then its defaults.
            params = [a.arg for a in fd.args.args]
            defaults = dict(zip(params[len(params) - len(fd.args.defaults):], fd.args.defaults))
            callee_env = {}
            for p, d in defaults.items():
                callee_env[p] = evaluate(d, {}, m)
            for p, a in zip(params, call.args):
                callee_env[p] = "<parser>" if p == "parser" else evaluate(a, env, mod)
            for k in call.keywords:
                callee_env[k.arg] = evaluate(k.value, env, mod)
            walk(fd.body, callee_env, m, f"{m.dotted}.{fd.name}")


def main():
    top = module("sdxl_train_network")
    walk(top.functions["setup_parser"].body, {}, top, "sdxl_train_network.setup_parser")
    names = [a["name"] for a in ARGS]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"duplicate argument names: {dupes}")
    json.dump({"source": "kohya-ss/sd-scripts", "commit": COMMIT, "script": "sdxl_train_network.py",
               "arguments": ARGS}, sys.stdout, indent=1, ensure_ascii=False, sort_keys=True)
    sys.stdout.write("\n")


main()
