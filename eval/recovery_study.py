"""The recovery study: what repairs a compressed model most per parameter, and does it carry to
compressed copies it was never trained on? On 2 CPU cores.

    python eval/recovery_study.py --preset smollm2     # recipes/recovery-smollm2.yaml (resumable)
    python eval/recovery_study.py --preset gemma3      # recipes/recovery-gemma3.yaml

1. The preset's recipe through ``ctp run`` (resumable: finished compressions and prompts are
   kept): the compressed copies, every prompt cell, and every prompt scored on every copy (the
   transfer matrix, test split).
2. The dense model behind each prompt tuned on it (``@dense``), on the same test windows: what a
   recipe does with no compression to undo (net recovery).
3. LoRA r=8 on every decoder Linear of each main target that a selected cell trains on alone,
   with that cell's data, steps, schedule, seed and honest loss (BOS by the rule), lr 1e-3
   (eval/prompt_study.py's loop): the ceiling, with its parameters.

Recovery is a share of the log-perplexity gap against the dense model: gross =
``(log ppl_c - log ppl_c+p) / (log ppl_c - log ppl_d)``; net subtracts what the same recipe does
for the dense model: ``(gap before - gap after) / gap before`` with gap after =
``log ppl_c+p - log ppl_d+p``. A distillation prompt's dense counterpart is the dense model
itself (its target is the dense model), so its net equals its gross. Writes
``eval/results/recovery-PRESET.{json,md}`` and the transfer heatmap ``recovery-PRESET.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

from ctp.data import load_text, tokenize  # noqa: E402
from ctp.evaluation.perplexity import perplexity_of_ids  # noqa: E402
from ctp.evaluation.transfer import gap_recovered, transfer_table  # noqa: E402
from ctp.lm import bos_token  # noqa: E402
from ctp.models import load_any, load_tokenizer  # noqa: E402
from ctp.prompt.kinds import context_of, load_prompt  # noqa: E402
from ctp.recipe import load_recipe, run_recipe  # noqa: E402
from ctp.zoo import weights_note  # noqa: E402
from prompt_study import train_adapter  # noqa: E402

RESULTS = REPO / "eval" / "results"
PRESETS = {
    "smollm2": dict(recipe=REPO / "recipes" / "recovery-smollm2.yaml",
                    main=("wanda-50pct+nf4", "sparsegpt-50pct+nf4-obs")),
    "gemma3": dict(recipe=REPO / "recipes" / "recovery-gemma3.yaml",
                   main=("wanda-50pct+nf4", "sparsegpt-50pct+nf4-obs")),
}


def net_recovered(dense: float, compressed: float, dense_prompted: float, prompted: float) -> float:
    """Share of the compression gap undone beyond what the same recipe does for the dense model."""
    before = math.log(compressed) - math.log(dense)
    after = math.log(prompted) - math.log(dense_prompted)
    return (before - after) / before


def prompt_row(name: str, folder: Path) -> dict:
    meta = json.loads((folder / "ctp_prompt.json").read_text())
    cfg = meta["prompt_config"]
    # training time per step of the run that finished it (a resumed run times only its own steps)
    tokens_per_second = meta.get("train_tokens_per_second_this_run") or 0.0
    width = meta["hidden_size"] if meta.get("prompt_type", "input") == "input" else \
        meta["kv_layers"] * 2 * meta["kv_heads"] * meta["head_dim"]
    objective = meta.get("objective", "nll") if meta["steps"] else "none (0 steps)"
    return {"name": name, "kind": meta.get("prompt_type", "input"), "objective": objective,
            "tokens": meta["num_virtual_tokens"], "params": meta["num_virtual_tokens"] * width,
            "steps": meta["steps"], "best_step": meta["best_step"], "best_val_ppl": meta["best_val_ppl"],
            "seconds_per_step": (meta["global_batch"] * meta["seqlen"] / tokens_per_second
                                 if meta["steps"] and tokens_per_second else 0.0),
            "init": cfg["init"], "trained_on": meta.get("compression_label")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, required=True)
    p.add_argument("--workdir", help="override the recipe's workdir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry (as ctp run --set), e.g. for a smoke run")
    p.add_argument("--results", default=str(RESULTS), help="where the tables go")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA ceiling")
    p.add_argument("--only", metavar="NAME,...",
                   help="run and tabulate only these prompt cells of the recipe, in this order (the rest of "
                        "the recipe is left for a later run: finished cells are kept)")
    p.add_argument("--tag", help="write recovery-PRESET-TAG.* instead of recovery-PRESET.* (a later run of other "
                                  "cells beside an earlier one's tables)")
    p.add_argument("--merge", metavar="TAG,...",
                   help="train and score nothing: join earlier runs' results (recovery-PRESET[-TAG].json; '-' "
                        "for the untagged one) into one table, written under --tag. Refused unless every run "
                        "scored the same compressed copies alike (the same bare and dense perplexities)")
    p.add_argument("--smoke", action="store_true",
                   help="a quick run of every step (2 training steps, 4 windows): checks the pipeline, "
                        "measures nothing; use with --workdir and --results elsewhere")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    results = Path(args.results)
    if args.merge:
        if not args.tag:
            p.error("--merge needs --tag: the joined table is written as recovery-PRESET-TAG.*")
        tags = [t.strip() for t in args.merge.split(",") if t.strip()]
        paths = [results / (f"recovery-{args.preset}" + ("" if t == "-" else f"-{t}") + ".json") for t in tags]
        missing = [str(q) for q in paths if not q.exists()]
        if missing:
            print(f"recovery_study: --merge: no results {', '.join(missing)}", file=sys.stderr)
            sys.exit(2)
        try:
            summary, matrix, dense_rows = merge_runs([json.loads(q.read_text()) for q in paths], tags)
        except ValueError as exc:
            print(f"recovery_study: {exc}", file=sys.stderr)
            sys.exit(1)
        write(f"recovery-{args.preset}-{args.tag}", summary, matrix, dense_rows,
              json.loads(paths[0].read_text())["max_windows"], results)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    recipe = load_recipe(preset["recipe"], args.set)
    if args.workdir:
        recipe.workdir = Path(args.workdir)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in recipe.prompts]
        if unknown:
            p.error(f"--only: no prompt cell {', '.join(unknown)} in {preset['recipe'].name}")
        recipe.prompts = {n: recipe.prompts[n] for n in names}
    if args.smoke:
        import dataclasses

        for name, config in recipe.compress.items():
            recipe.compress[name] = dataclasses.replace(config, nsamples=4)
        for step in recipe.prompts.values():
            step.config = dataclasses.replace(step.config, steps=min(step.config.steps or 0, 2), eval_every=1,
                                              eval_windows=2, save_every=1)
        recipe.eval = dataclasses.replace(recipe.eval, max_windows=2)
    matrix = run_recipe(recipe, progress=False)  # resumable: finished steps are skipped
    results.mkdir(parents=True, exist_ok=True)
    stem = f"recovery-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    shutil.copyfile(recipe.workdir / "results" / "transfer.png", results / f"{stem}.png")
    log_path = results / f"{stem}.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in log_path.read_text().splitlines()} \
        if log_path.exists() else {}

    def record(name: str, row: dict) -> dict:
        if name not in done:
            done[name] = {"name": name, **row}
            with log_path.open("a") as fh:
                fh.write(json.dumps(done[name]) + "\n")
        return done[name]

    ev = recipe.eval
    tokenizer = load_tokenizer(recipe.model)
    workdir = recipe.workdir
    dense_ppl = matrix["dense"]["ppl"]
    dense_prompts = [n for n, s in recipe.prompts.items() if s.targets == ["dense"]]
    if any(f"dense+{n}" not in done for n in dense_prompts):
        dense = load_any(recipe.model, device="cpu")
        bos = bos_token(ev.bos, dense.config, tokenizer)
        test = tokenize(tokenizer, load_text(ev.ppl[0], ev.split), bos)
        for n in dense_prompts:
            if f"dense+{n}" not in done:
                context = context_of(dense, load_prompt(workdir / "prompts" / n), bos)
                record(f"dense+{n}", {"ppl": perplexity_of_ids(dense, test, matrix["seqlen"], context, ev.batch_size,
                                                               ev.max_windows).ppl})
        del dense
    models = {Path(m["model"]).name: (i, m) for i, m in enumerate(matrix["models"])}
    prompts = {Path(q["prompt"]).name: j for j, q in enumerate(matrix["prompts"])}
    summary = []
    for name, step in recipe.prompts.items():
        if step.targets == ["dense"]:
            continue
        if len(step.targets) > 1:  # one row per copy it trained on (distillation: net = gross)
            info = prompt_row(name, workdir / "prompts" / name)
            for target in step.targets:
                i, row = models[target]
                cell = matrix["cells"][i][prompts[name]]
                dense_prompted = dense_ppl if info["objective"] != "nll" else None
                summary.append({**info, "target": row["label"], "dense": dense_ppl, "compressed": row["ppl"],
                                "tuned": cell["ppl"], "gross": gap_recovered(dense_ppl, row["ppl"], cell["ppl"]),
                                "dense_prompted": dense_prompted,
                                "net": None if dense_prompted is None else
                                net_recovered(dense_ppl, row["ppl"], dense_prompted, cell["ppl"])})
            continue
        target = step.targets[0]
        i, row = models[target]
        cell = matrix["cells"][i][prompts[name]]
        info = prompt_row(name, workdir / "prompts" / name)
        counterpart = None
        if info["objective"] == "nll":  # the same recipe on the dense model, if the study has it
            counterpart = next((f"dense+{d}" for d in dense_prompts
                                if recipe.prompts[d].config.prompt_type == step.config.prompt_type
                                and recipe.prompts[d].config.objective == "nll"
                                and recipe.prompts[d].config.num_virtual_tokens == step.config.num_virtual_tokens), None)
        # a distillation prompt (or a start no loss shaped) on the dense model is the dense model
        dense_prompted = done[counterpart]["ppl"] if counterpart else (
            dense_ppl if info["objective"] != "nll" else None)
        summary.append({**info, "target": row["label"], "dense": dense_ppl, "compressed": row["ppl"],
                        "tuned": cell["ppl"], "gross": gap_recovered(dense_ppl, row["ppl"], cell["ppl"]),
                        "dense_prompted": dense_prompted,
                        "net": None if dense_prompted is None else
                        net_recovered(dense_ppl, row["ppl"], dense_prompted, cell["ppl"])})
    if not args.no_lora:
        from transformers import AutoConfig

        bos = bos_token(ev.bos, AutoConfig.from_pretrained(matrix["models"][0]["model"]), tokenizer)
        # the ceiling beside each main target that a selected cell trains on alone (with its budget)
        configs = {t: next((s.config for s in recipe.prompts.values() if s.targets == [t]), None)
                   for t in preset["main"]}
        for target, config in configs.items():
            if config is None:
                logging.info("LoRA on %s: no selected prompt cell trains on it alone, skipped", target)
                continue
            name = f"lora-{target}"
            folder = str(workdir / "models" / target)
            i, row = models[target]
            if name not in done:
                train = tokenize(tokenizer, load_text(config.data, "train"), bos)
                val = tokenize(tokenizer, load_text(config.data, "validation"), bos)
                peft_model, meta = train_adapter(folder, train, val, "lora", config, config.seqlen,
                                                 config.batch_size, lr=1e-3, bos=bos)
                test = tokenize(tokenizer, load_text(ev.ppl[0], ev.split), bos)
                with torch.no_grad():
                    ppl = perplexity_of_ids(peft_model, test, matrix["seqlen"], context_of(peft_model, None, bos),
                                            ev.batch_size, ev.max_windows).ppl
                record(name, {"ppl": ppl, **meta})
            lora = done[name]
            summary.append({"name": name, "kind": "LoRA r=8", "objective": "nll", "tokens": None,
                            "params": lora["params"], "steps": lora["steps"], "best_step": lora["best_step"],
                            "best_val_ppl": lora["best_val_ppl"], "seconds_per_step": lora["seconds_per_step"],
                            "target": row["label"], "dense": dense_ppl, "compressed": row["ppl"],
                            "tuned": lora["ppl"], "gross": gap_recovered(dense_ppl, row["ppl"], lora["ppl"]),
                            "dense_prompted": None, "net": None})
    write(stem, summary, matrix, {n: done[f"dense+{n}"]["ppl"] for n in dense_prompts}, ev.max_windows, results)


def merge_runs(runs: list[dict], tags: list[str]) -> tuple[list[dict], dict, dict]:
    """One summary, transfer matrix and dense-counterpart table from several runs' results, which
    must have scored the same copies under the same protocol alike (else ValueError naming what
    differs): rows of every run, prompt columns side by side (named by their recipe cells), a
    prompt measured twice kept once."""
    first = runs[0]["transfer"]
    protocol = ("data", "split", "seqlen", "bos")
    windows = {run.get("max_windows") for run in runs}
    if len(windows) != 1 or None in windows:
        raise ValueError(f"the runs scored different numbers of test windows ({sorted(map(str, windows))})")
    models = {m["label"]: m["ppl"] for m in first["models"]}
    for tag, run in zip(tags[1:], runs[1:]):
        other = run["transfer"]
        if any(other.get(k) != first.get(k) for k in protocol):
            raise ValueError(f"run {tag} used another protocol than {tags[0]}: "
                             + ", ".join(f"{k} {other.get(k)} vs {first.get(k)}" for k in protocol
                                         if other.get(k) != first.get(k)))
        if not math.isclose(other["dense"]["ppl"], first["dense"]["ppl"], rel_tol=1e-9):
            raise ValueError(f"run {tag} scored the dense model {other['dense']['ppl']:.6f}, "
                             f"run {tags[0]} {first['dense']['ppl']:.6f}: not the same test windows")
        theirs = {m["label"]: m["ppl"] for m in other["models"]}
        differ = [f"{k} {theirs.get(k)} vs {v:.6f}" for k, v in models.items()
                  if theirs.get(k) is None or not math.isclose(theirs[k], v, rel_tol=1e-9)]
        if differ or set(theirs) != set(models):
            raise ValueError(f"run {tag} scored other compressed copies than run {tags[0]} "
                             f"({'; '.join(differ) or 'other models'}): their prompts do not compare")
    summary, seen, dense_rows = [], set(), {}
    matrix = {k: v for k, v in first.items() if k not in ("prompts", "cells", "recipe_key")}
    matrix["prompts"], matrix["cells"] = [], [[] for _ in first["models"]]
    for run in runs:
        transfer_run = run["transfer"]
        order = {m["label"]: i for i, m in enumerate(transfer_run["models"])}
        for j, prompt in enumerate(transfer_run["prompts"]):
            if prompt["prompt"] in {q["prompt"] for q in matrix["prompts"]}:
                continue
            # named by the cell; what it was trained for read off ctp's label (kind, n, -objective, @)
            objective = re.match(r"^(?:kv|p)\d+(?:-([a-z+]+))?@", prompt["label"])
            matrix["prompts"].append({**prompt, "label": Path(prompt["prompt"]).name,
                                      "objective": (objective.group(1) or "nll") if objective else None})
            for i, row in enumerate(first["models"]):
                matrix["cells"][i].append(transfer_run["cells"][order[row["label"]]][j])
        for row in run["summary"]:
            if (row["name"], row["target"]) not in seen:
                seen.add((row["name"], row["target"]))
                summary.append(row)
        dense_rows.update(run.get("dense_prompted", {}))
    return summary, matrix, dense_rows


def net_transfer_table(summary: list[dict], matrix: dict, dense_rows: dict) -> str:
    """Markdown: every cell of the transfer matrix as a net share -- what the prompt does to a copy
    beyond what the same recipe does to the dense model (a distillation prompt's counterpart is the
    dense model itself; a prompt tuned on the dense model is its own). Blank where the study has
    no counterpart for the prompt."""
    dense = matrix["dense"]["ppl"]
    counterpart = {Path(q["prompt"]).name: dense for q in matrix["prompts"] if q.get("objective") in ("kd", "start")}
    counterpart.update({r["name"]: r["dense_prompted"] for r in summary if r.get("dense_prompted") is not None})
    counterpart.update(dense_rows)
    names = [Path(q["prompt"]).name for q in matrix["prompts"]]
    lines = ["Net shares of each copy's gap: the same cells, less what each prompt's recipe does for the "
             "dense model (blank: no dense counterpart measured).", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row, cells in zip(matrix["models"], matrix["cells"]):
        parts = [row["label"]]
        for name, cell in zip(names, cells):
            d = counterpart.get(name)
            parts.append("" if d is None or "ppl" not in cell else
                         f"{net_recovered(dense, row['ppl'], d, cell['ppl']) * 100:.1f}%")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def write(stem: str, summary: list[dict], matrix: dict, dense_rows: dict, windows: int, results: Path) -> None:
    note = weights_note(matrix["dense"]["model"]) or ""
    lines = [f"{note} Test perplexity ({matrix['data']} test split, first {windows} windows of "
             f"{matrix['seqlen']} tokens, BOS {matrix.get('bos', 'auto')}); dense {matrix['dense']['ppl']:.3f}.", "",
             "| target | prompt | kind | objective | parameters | best step / steps | s/step | ppl compressed | "
             "ppl with it | gross | dense with the same recipe | net |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        dense_prompted = f"{r['dense_prompted']:.3f}" if r["dense_prompted"] else ""
        net = f"{r['net'] * 100:.1f}%" if r["net"] is not None else ""
        lines.append(f"| {r['target']} | {r['name']} | {r['kind']} | {r['objective']} | {r['params']:,} | "
                     f"{r['best_step']} / {r['steps']} | {r['seconds_per_step']:.2f} | {r['compressed']:.3f} | "
                     f"{r['tuned']:.3f} | {r['gross'] * 100:.1f}% | {dense_prompted} | {net} |")
    if dense_rows:
        lines += ["", "The dense model behind the prompts tuned on it: " + ", ".join(
            f"{n} {v:.3f}" for n, v in dense_rows.items()) + "."]
    text = "\n".join(lines) + "\n\n" + transfer_table(matrix) + "\n\n" + net_transfer_table(summary, matrix, dense_rows) + "\n"
    (results / f"{stem}.md").write_text(text)
    (results / f"{stem}.json").write_text(json.dumps({"summary": summary, "dense_prompted": dense_rows,
                                                      "max_windows": windows, "transfer": matrix}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
