"""``python -m autodeploy.eval COMMAND [options] [config overrides]``: the accuracy tier.

    python -m autodeploy.eval perplexity --model M --text FILE [--window W] [--stride S] [--hf]
    python -m autodeploy.eval compare-hf --model M [--max-tokens N] [--atol X]

Anything else on the line configures the run as for ``launch.py`` (``--model``, ``args.*`` /
``--args.*`` overrides, ``prompt=chat``, ...). ``perplexity`` scores the text's tokens over strided
windows (default: windows of ``args.max_seq_len``, stride half of it) through ``prompt_logprobs``;
``--hf`` also runs HF transformers on the same weights and windows. ``compare-hf`` runs the run's
prompt queries (``prompt.queries``) greedily and compares tokens and log-probabilities with HF
transformers on the same weights; it exits 1 on a mismatch beyond the tolerance. A mistake of the
user's (a missing file, an unknown model, a bad override) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m autodeploy.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    # no abbreviations: the config flags (--args.*) pass through to the run's config
    ppl = sub.add_parser("perplexity", help="perplexity of a text file over strided windows", allow_abbrev=False)
    ppl.add_argument("--text", required=True, help="a UTF-8 text file")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: args.max_seq_len)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window // 2)")
    ppl.add_argument("--hf", action="store_true", help="also HF transformers on the same weights and windows")
    ppl.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    cmp = sub.add_parser("compare-hf", help="greedy tokens and logprobs against HF transformers", allow_abbrev=False)
    cmp.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    cmp.add_argument("--atol", type=float, default=None,
                     help="tolerance on a log-probability (default: 1e-3 in float32, 0.1 in bfloat16, 0.05 in float16)")
    cmp.add_argument("--json", default=None, help="also write the comparison to this JSON file")
    return ap


def build_llm(overrides: list[str]):
    from ..config import compose_experiment
    from ..llm import LLM

    return LLM.from_config(compose_experiment(overrides))


def run_perplexity(opts: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from ..config.errors import UserError
    from . import perplexity as ppl

    if not Path(opts.text).is_file():  # before any model work
        raise UserError(f"--text {opts.text}: no such file")
    if opts.window is not None or opts.stride is not None:
        window = opts.window or 2 ** 31
        ppl.strided_windows(2, window, opts.stride or max(window // 2, 1))  # checks window and stride
    llm = build_llm(overrides)
    try:
        ids = ppl.read_text_ids(llm, opts.text)
        window = opts.window or int(llm.args.max_seq_len)
        stride = opts.stride or max(window // 2, 1)
        ours = ppl.perplexity(llm, ids, window, stride)
        hf = ppl.hf_perplexity(_hf(llm), ids, window, stride) if opts.hf else None
    finally:
        llm.shutdown()
    windows = len(ppl.strided_windows(len(ids), window, stride))
    print(ppl.report(ours, hf, f"perplexity of {opts.text}: {len(ids)} tokens, {windows} windows of {window} "
                                f"tokens, stride {stride} (model {llm.config.model}, {str(llm.factory.dtype).removeprefix('torch.')})"))
    _write_json(opts.json, {"text": opts.text, "tokens": len(ids), "window": window, "stride": stride,
                            "model": str(llm.config.model), "perplexity": ours.perplexity, "nll": ours.mean_nll,
                            "hf_perplexity": hf and hf.perplexity, "hf_nll": hf and hf.mean_nll})
    return 0


def run_compare_hf(opts: argparse.Namespace, overrides: list[str]) -> int:
    from ..config.errors import UserError
    from . import compare_hf

    if opts.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {opts.max_tokens}")
    llm = build_llm(overrides)
    try:
        if llm.tokenizer is None:
            raise UserError(f"model {llm.config.model} has no tokenizer: compare-hf runs the text prompts")
        prompts = list(llm.config.prompt.queries)
        if not prompts:
            raise UserError("prompt.queries is empty: nothing to compare")
        dtype = str(llm.factory.dtype).removeprefix("torch.")
        atol = opts.atol if opts.atol is not None else compare_hf.ATOL.get(dtype, 0.1)
        results = compare_hf.compare(llm, prompts, opts.max_tokens, atol)
    finally:
        llm.shutdown()
    print(compare_hf.report(results, atol, f"compare-hf: model {llm.config.model} ({dtype}), {len(prompts)} "
                                           f"prompts, {opts.max_tokens} greedy tokens each"))
    _write_json(opts.json, {"model": str(llm.config.model), "dtype": dtype, "atol": atol,
                            "prompts": [vars(r) for r in results], "ok": all(r.ok(atol) for r in results)})
    return 0 if all(r.ok(atol) for r in results) else 1


def _hf(llm: Any):
    from .reference import hf_model

    return hf_model(llm)


def _write_json(path: Optional[str], data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def main(argv: Optional[list[str]] = None) -> int:
    from ..config.errors import find_user_error

    opts, overrides = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"perplexity": run_perplexity, "compare-hf": run_compare_hf}[opts.command](opts, overrides)
    except Exception as e:  # noqa: BLE001 - a user's mistake is one line, exit 2; anything else is a bug
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"Error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
