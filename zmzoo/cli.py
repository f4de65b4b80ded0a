"""Command line: ``python -m zmzoo generate | bench | eval``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


def parse_setting(kv: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value): an int, else a float, else none/true/false, else the string."""
    k, sep, v = kv.partition("=")
    if not sep or not k:
        raise SystemExit(f"a cache setting is KEY=VALUE, got {kv!r}")
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, {"none": None, "true": True, "false": False}.get(v.lower(), v)


def _generate(ns: argparse.Namespace) -> int:
    import zmzoo

    if (ns.prompt is None) == (ns.prompt_file is None):
        print("give exactly one of --prompt TEXT or --prompt-file FILE", file=sys.stderr)
        return 2
    if ns.prompt_file is not None:
        path = Path(ns.prompt_file)
        if not path.is_file():
            print(f"--prompt-file {path}: no such file", file=sys.stderr)
            return 2
        prompt = path.read_text()
    else:
        prompt = ns.prompt
    kw = {}
    if ns.kv_ratio is not None:
        kw["kv_ratio"] = ns.kv_ratio
    if ns.kv_budget is not None:
        kw["kv_budget"] = ns.kv_budget
    compile = {"auto": "auto", "on": True, "off": False}[ns.compile]
    if ns.no_compile:
        compile = False
    quantize = None if ns.quantize == "none" else ns.quantize
    kw.update(parse_setting(x) for x in ns.cache_setting)
    gen = zmzoo.load(ns.model, method=ns.method, device=ns.device, dtype=ns.dtype, max_seq_len=ns.max_seq_len,
                     compile=compile, preset=ns.preset, revision=ns.revision, quantize=quantize,
                     group_size=ns.group_size, act_quant=None if ns.act_quant == "none" else ns.act_quant,
                     tp="auto" if ns.tp == "auto" else False, **kw)  # prints what it loaded
    tp = gen.model.tp
    if tp is not None and not tp.is_first:  # under torchrun every rank generates the same tokens; rank 0 prints
        return _run_quietly(gen, prompt, ns)
    n_prompt = len(gen.encode_prompt(prompt, chat=ns.chat))
    print(f"[zmzoo] prompt: {n_prompt} tokens", file=sys.stderr)
    for piece in gen.stream(prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, chat=ns.chat):
        print(piece, end="", flush=True)
    print()
    st = gen.last_stats
    cs = gen.cache_stats()
    who = f" rank 0 of {tp.world} (its cache and weights):" if tp is not None else ""
    print(f"[zmzoo]{who} prefill {st.prefill_s:.2f}s ({n_prompt / max(st.prefill_s, 1e-9):.0f} tok/s); decode "
          f"{st.decode_tokens_per_s:.1f} tok/s; KV cache {cs['cache_bytes'] / 2**20:.1f} MiB "
          f"(full cache: {cs['full_cache_bytes'] / 2**20:.1f} MiB, {100 * cs['ratio']:.1f}%); weights "
          f"{cs['weight_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def _run_quietly(gen, prompt: str, ns: argparse.Namespace) -> int:
    """A tensor-parallel rank other than 0: the same generation (its collectives pair with rank 0's), no output."""
    for _ in gen.stream(prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, chat=ns.chat):
        pass
    return 0


# the benchmark programs: bench/ beside zmzoo/ in a source checkout (they are not part of the installed package)
BENCH_COMMANDS = {"bench": ("decode", "decode speed/memory benchmark"),
                  "eval": ("quality", "quality harness: passkey, NLL, attention error")}


def _checkout() -> Path:
    """Where a source checkout holding this zmzoo would have its root (bench/ and pyproject.toml beside zmzoo/)."""
    return Path(__file__).resolve().parents[1]


def _import_bench(root: Path) -> None:
    """Import the checkout's ``bench`` package: ``python -m`` puts the working directory on the path, which need not
    be the checkout, so it is loaded from its location (sys.path is left alone)."""
    init = (root / "bench" / "__init__.py").resolve()
    mod = sys.modules.get("bench")
    if mod is not None:
        if Path(getattr(mod, "__file__", None) or "").resolve() != init:
            raise RuntimeError(f"another 'bench' package ({getattr(mod, '__file__', mod)}) is imported; zmzoo's is "
                               f"{init}")
        return
    spec = importlib.util.find_spec("bench")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == init:
        importlib.import_module("bench")
        return
    spec = importlib.util.spec_from_file_location("bench", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod
    spec.loader.exec_module(mod)


def _run_bench(cmd: str, argv: list[str]) -> int:
    """``python -m zmzoo bench|eval ARGS``: ``bench.decode`` / ``bench.quality``'s command line with ARGS."""
    name = BENCH_COMMANDS[cmd][0]
    root = _checkout()
    if not ((root / "pyproject.toml").is_file() and (root / "bench" / "__init__.py").is_file()
            and (root / "bench" / f"{name}.py").is_file()):
        print(f"'python -m zmzoo {cmd}' runs bench/{name}.py, which ships with the source checkout of zmzoo, not with "
              f"the installed package (this zmzoo is {Path(__file__).resolve().parent}, with no bench/ beside it). "
              f"Clone the zmzoo repository and run 'python -m zmzoo {cmd} ...' (or 'python -m bench.{name} ...' from "
              f"its root) there.", file=sys.stderr)
        return 2
    _import_bench(root)
    program = importlib.import_module(f"bench.{name}")
    try:
        return int(program.cli(argv) or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCH_COMMANDS:
        return _run_bench(argv[0], argv[1:])
    p = argparse.ArgumentParser(prog="python -m zmzoo", description="zmzoo: LLM inference with compressed KV caches")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, (name, what) in BENCH_COMMANDS.items():
        sub.add_parser(cmd, help=f"{what} (bench/{name}.py of a source checkout; --help there)")
    g = sub.add_parser("generate", help="stream an answer to a prompt")
    g.add_argument("--model", required=True, help="model name (zmzoo.known_models()), hub repo, dir or .gguf")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--kv-ratio", type=float, help="cache budget as a fraction of max_seq_len (selects ZeroMerge)")
    g.add_argument("--kv-budget", type=int, help="cache budget in slots (selects ZeroMerge)")
    g.add_argument("--method", choices=["full", "zeromerge", "h2o", "streaming", "snapkv", "tova", "knorm"])
    g.add_argument("--preset", help="named ZeroMerge settings, e.g. retrieval")
    g.add_argument("--cache-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a cache setting, over the preset's (repeatable): --cache-setting lookahead=48")
    g.add_argument("--max-seq-len", type=int)
    g.add_argument("--device")
    g.add_argument("--dtype")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the decode step: auto (default) = on CUDA only; on = also on a CPU (inductor, the "
                        "first call waits minutes); off = eager")
    g.add_argument("--no-compile", action="store_true", help="the same as --compile off")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub model")
    g.add_argument("--quantize", choices=["auto", "none", "int8", "int4", "gguf"], default="auto",
                   help="weight-only quantization (zmzoo.load's quantize): auto (default) = a GGUF keeps its Q8_0/Q4_0/"
                        "Q4_1 tensors on CUDA, full precision otherwise; none; int8 (per channel); int4 (per group); "
                        "gguf = keep a GGUF's quantization on any device")
    g.add_argument("--group-size", type=int, help="int4 columns per scale: 32, 64 (default) or 128")
    g.add_argument("--act-quant", choices=["none", "int8"], default="none",
                   help="int8: the decode step's quantized products also quantize their activations (W8A8 / W4A8; "
                        "zmzoo.load's act_quant); needs quantized weights")
    g.add_argument("--tp", choices=["auto", "off"], default="auto",
                   help="tensor parallelism (zmzoo.load's tp): auto = sharded over torchrun's ranks when started by "
                        "torchrun (rank 0 prints), off = every process loads the whole model")
    ns = p.parse_args(argv)
    if ns.cmd == "generate":
        return _generate(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
