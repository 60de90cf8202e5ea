"""What does a soft prompt win back on a real pretrained model? SmolLM2-135M, on 2 CPU cores.

    python eval/smollm2_study.py               # resumable: run it again (timings: README)

1. ``recipes/smollm2-study.yaml`` through ``ctp run`` (resumable): five compressed copies, three
   prompts (10 tokens on Wanda-50% + NF4, Wanda-2:4 + NF4 and the dense model), every
   prompt scored on every compressed copy (transfer table and heatmap).
2. The dense model behind each dense-tuned prompt, on the same test windows.
3. LoRA r=8 on every decoder Linear of the two compressed targets, the same data, steps, schedule
   and honest loss (eval/prompt_study.py's loop) at lr 1e-3: the ceiling a prompt is compared with.

Recovery is measured on log perplexity against the dense model: gross =
(log ppl_c - log ppl_c+p) / (log ppl_c - log ppl_d); net subtracts what the same prompt recipe
does for the dense model: (gap before - gap after) / gap before, with gap after =
log ppl_c+p - log ppl_d+p. Writes eval/results/smollm2_study.{json,md} and smollm2_transfer.png.
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import math
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

from ctp.artifacts import load_prompt_embeddings  # noqa: E402
from ctp.data import load_text, tokenize  # noqa: E402
from ctp.evaluation.perplexity import perplexity_of_ids  # noqa: E402
from ctp.evaluation.transfer import gap_recovered, transfer_table  # noqa: E402
from ctp.models import load_any, load_tokenizer  # noqa: E402
from ctp.recipe import load_recipe, run_recipe  # noqa: E402
from ctp.zoo import weights_note  # noqa: E402
from prompt_study import train_adapter  # noqa: E402

RESULTS = REPO / "eval" / "results"
RECIPE = REPO / "recipes" / "smollm2-study.yaml"
TARGETS = ("wanda-50pct+nf4", "wanda-2of4+nf4")
LENGTHS = (10,)  # the 50-token prompts: eval/smollm2_p50.sh


def net_recovered(dense: float, compressed: float, dense_prompted: float, prompted: float) -> float:
    """Share of the compression gap a prompt undoes beyond what it does for the dense model."""
    before = math.log(compressed) - math.log(dense)
    after = math.log(prompted) - math.log(dense_prompted)
    return (before - after) / before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="override the recipe's workdir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry (as ctp run --set), e.g. for a smoke run")
    p.add_argument("--results", default=str(RESULTS), help="where the tables go")
    args = p.parse_args()
    results = Path(args.results)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 when sharing the machine
    recipe = load_recipe(RECIPE, args.set)
    if args.workdir:
        recipe.workdir = Path(args.workdir)
    matrix = run_recipe(recipe, progress=False)  # resumable: finished steps are skipped
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe.workdir / "results" / "transfer.png", results / "smollm2_transfer.png")
    log_path = results / "smollm2_study.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in log_path.read_text().splitlines()} \
        if log_path.exists() else {}

    def record(name: str, row: dict) -> dict:
        if name not in done:
            done[name] = {"name": name, **row}
            with log_path.open("a") as fh:
                fh.write(json.dumps(done[name]) + "\n")
        return done[name]

    tokenizer = load_tokenizer(recipe.model)
    ev = recipe.eval
    test = tokenize(tokenizer, load_text("embedded", "test"))
    dense_ppl = matrix["dense"]["ppl"]
    prompts = {p["prompt"]: i for i, p in enumerate(matrix["prompts"])}
    rows = {m["model"]: i for i, m in enumerate(matrix["models"])}
    workdir = recipe.workdir
    if not all(f"dense+p{n}" in done for n in LENGTHS):
        dense_model = load_any(recipe.model)
        for n in LENGTHS:
            if f"dense+p{n}" not in done:
                prompt = load_prompt_embeddings(workdir / "prompts" / f"p{n}-dense")
                ppl = perplexity_of_ids(dense_model, test, ev.seqlen, prompt=prompt, batch_size=8,
                                        max_windows=ev.max_windows).ppl
                record(f"dense+p{n}", {"ppl": ppl})
        del dense_model
    train = tokenize(tokenizer, load_text("embedded", "train"))
    val = tokenize(tokenizer, load_text("embedded", "validation"))
    summary = []
    for target in TARGETS:
        folder = workdir / "models" / target
        row = matrix["models"][rows[str(folder)]]
        for n in LENGTHS:
            cell = matrix["cells"][rows[str(folder)]][prompts[str(workdir / "prompts" / f"p{n}-{target}")]]
            dense_prompted = done[f"dense+p{n}"]["ppl"]
            summary.append({"target": row["label"], "method": f"prompt n={n}", "dense": dense_ppl,
                            "dense_prompted": dense_prompted, "compressed": row["ppl"], "tuned": cell["ppl"],
                            "gross": gap_recovered(dense_ppl, row["ppl"], cell["ppl"]),
                            "net": net_recovered(dense_ppl, row["ppl"], dense_prompted, cell["ppl"])})
        name = f"lora-{target}"
        if name not in done:
            config = recipe.prompts[f"p10-{target}"].config
            lora = type(config)(**{**config.__dict__, "lr": 1e-3})
            model, meta = train_adapter(folder, train, val, "lora", lora, lora.seqlen, lora.batch_size)
            ppl = perplexity_of_ids(model, test, ev.seqlen, batch_size=8, max_windows=ev.max_windows).ppl
            record(name, {"ppl": ppl, **meta})
        summary.append({"target": row["label"], "method": "LoRA r=8 (ceiling)", "dense": dense_ppl,
                        "dense_prompted": None, "compressed": row["ppl"], "tuned": done[name]["ppl"],
                        "gross": gap_recovered(dense_ppl, row["ppl"], done[name]["ppl"]), "net": None,
                        "params": done[name]["params"]})
    write(summary, matrix, ev.max_windows, results)


def write(summary: list[dict], matrix: dict, windows: int, results: Path) -> None:
    lines = [f"{weights_note(matrix['dense']['model'])} Test perplexity (embedded test split, "
             f"first {windows} windows of {matrix['seqlen']} tokens); dense {matrix['dense']['ppl']:.3f}.", "",
             "| target | method | ppl compressed | ppl with it | gross recovered | dense with the same prompt | net recovered |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        dense_prompted = f"{r['dense_prompted']:.3f}" if r["dense_prompted"] else ""
        net = f"{r['net'] * 100:.1f}%" if r["net"] is not None else ""
        lines.append(f"| {r['target']} | {r['method']} | {r['compressed']:.3f} | {r['tuned']:.3f} | "
                     f"{r['gross'] * 100:.1f}% | {dense_prompted} | {net} |")
    text = "\n".join(lines) + "\n\n" + transfer_table(matrix) + "\n"
    (results / "smollm2_study.md").write_text(text)
    (results / "smollm2_study.json").write_text(json.dumps({"summary": summary, "transfer": matrix}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
