"""Print the headline figures of a run's results.json: `python scripts/summarize_results.py RESULTS...`."""

import json
import sys


def summarize(path: str) -> str:
    try:
        r = json.load(open(path))
    except OSError as e:
        return f"  no results: {e}"
    lines = [f"  {r['config']['model']} ({r['env']['device']}, rev {r['env']['git_rev']}): build {r['build_s']:.1f}s"]
    b = r.get("benchmark")
    if b:
        lines.append(f"  bs {b['bs']} isl {b['isl']} osl {b['osl']}: {b['output_tok_s']:.1f} output tok/s, "
                     f"TTFT p50 {b['ttft_ms']['p50']:.1f} ms, TPOT p50 {b['tpot_ms']['p50']:.2f} ms")
        if "hf_baseline" in b:
            h = b["hf_baseline"]
            lines.append(f"  HF eager generate, same prompts: {h['output_tok_s']:.1f} output tok/s, "
                         f"TTFT p50 {h['ttft_ms']['p50']:.1f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summarize(p))
