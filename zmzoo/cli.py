"""Command line: ``python -m zmzoo generate | bench | eval``."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


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
    gen = zmzoo.load(ns.model, method=ns.method, device=ns.device, dtype=ns.dtype, max_seq_len=ns.max_seq_len,
                     compile=compile, preset=ns.preset, revision=ns.revision, **kw)  # prints what it loaded
    n_prompt = len(gen.encode_prompt(prompt, chat=ns.chat))
    print(f"[zmzoo] prompt: {n_prompt} tokens", file=sys.stderr)
    for piece in gen.stream(prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, chat=ns.chat):
        print(piece, end="", flush=True)
    print()
    st = gen.last_stats
    cs = gen.cache_stats()
    print(f"[zmzoo] prefill {st.prefill_s:.2f}s ({n_prompt / max(st.prefill_s, 1e-9):.0f} tok/s); decode "
          f"{st.decode_tokens_per_s:.1f} tok/s; KV cache {cs['cache_bytes'] / 2**20:.1f} MiB "
          f"(full cache: {cs['full_cache_bytes'] / 2**20:.1f} MiB, {100 * cs['ratio']:.1f}%)", file=sys.stderr)
    return 0


def _run_script(name: str, argv: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not script.is_file():
        print(f"{script} not found: 'python -m zmzoo {name}' runs from a source checkout of zmzoo", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return _run_script("decode", argv[1:])
    if argv and argv[0] == "eval":
        return _run_script("quality", argv[1:])
    p = argparse.ArgumentParser(prog="python -m zmzoo", description="zmzoo: LLM inference with compressed KV caches")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", help="decode speed/memory benchmark (bench/decode.py; --help there)")
    sub.add_parser("eval", help="quality harness (bench/quality.py; --help there)")
    g = sub.add_parser("generate", help="stream an answer to a prompt")
    g.add_argument("--model", required=True, help="model name (zmzoo.known_models()), hub repo, dir or .gguf")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--kv-ratio", type=float, help="cache budget as a fraction of max_seq_len (selects ZeroMerge)")
    g.add_argument("--kv-budget", type=int, help="cache budget in slots (selects ZeroMerge)")
    g.add_argument("--method", choices=["full", "zeromerge", "h2o", "streaming", "snapkv", "tova", "knorm"])
    g.add_argument("--preset", help="named ZeroMerge settings, e.g. retrieval")
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
    ns = p.parse_args(argv)
    if ns.cmd == "generate":
        return _generate(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
