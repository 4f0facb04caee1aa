"""``make eval HEADS=...`` / ``python -m ppd_decode.evaluation.report heads=[dir,...]``: match rates, latency model, report.

For each task (SQuAD, WMT15, CNN/DM): greedy continuations (batched) that keep every head layer's hidden state as
they go (``measure=capture``; ``measure=teacher_forced`` uses a second, teacher-forced pass instead), match rates
p_k(d) for every head and k, next to the untrained logit lens at the same layers; the greedy outputs' task scores
as context; the compute-latency model fed with the measured rates and stage timings measured here; JSON, CSV,
markdown and plots under the run directory (and docs/benchmarks/match_rate.* with ``publish=true``), logged to W&B.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ppd_decode.data.prompts import build_prompts, context_length
from ppd_decode.data.tasks import TaskConfig, load_task
from ppd_decode.errors import PPDError
from ppd_decode.evaluation.artifacts import provenance
from ppd_decode.evaluation.match_rate import (greedy_continuations, merge_scores, refuse_block_heads_for_capture,
                                              score_captured, score_heads)
from ppd_decode.evaluation.metrics import TASK_METRIC, load_metric
from ppd_decode.models.heads import EarlyExitHead, head_dirs, load_heads, read_head_config
from ppd_decode.models.loading import load_model
from ppd_decode.profiling.latency import (
    measure_stage_times,
    replicated,
    simulate_replicated,
    simulate_stage_pipelined,
    stage_pipelined,
)
from ppd_decode.runtime.timing import stopwatch

REPO = Path(__file__).resolve().parents[2]


def collect_heads(model, dirs: list[str], lens_layers: list[int]) -> dict[tuple[str, int], torch.nn.Module]:
    """Trained heads labelled by objective (a run directory's ``heads/`` or a single head), plus the logit lens."""
    heads: dict[tuple[str, int], torch.nn.Module] = {}
    for d in dirs:
        path = Path(d)
        for layer, hdir in head_dirs(path).items():
            info = read_head_config(hdir)
            label = info.get("objective", "trained")
            if label == "distill":
                label = f"distill-{info.get('distill_kind', 'kl')}"
            if "f_prev" in (info.get("inputs") or []):
                label += "+f_prev"
            if (label, layer) in heads:
                label = f"{label}:{path.parent.name or path.name}"
            heads[(label, layer)] = load_heads(hdir, model)[layer]
    layers = sorted({d for _, d in heads} | set(lens_layers))
    for d in layers:
        heads[("lens", d)] = EarlyExitHead.from_model(model, d)
    return heads


def _shortlist(heads, sc) -> torch.Tensor | None:
    return getattr(heads[(sc.label, sc.layer)], "shortlist", None)


def _shortlisted(heads, sc) -> bool:
    return _shortlist(heads, sc) is not None


def _among_rows(heads, sc, targets: torch.Tensor) -> float:
    """The share of positions whose greedy token the head can guess at all: among its shortlist's rows (a head that
    ranks the whole vocabulary: every one). No k reaches past it."""
    short = _shortlist(heads, sc)
    if short is None or not len(targets):
        return 1.0
    return float(torch.isin(targets, short.cpu()).float().mean())


def _has_reference(ref) -> bool:
    if isinstance(ref, (list, tuple)):
        return any(_has_reference(r) for r in ref)
    return isinstance(ref, str) and bool(ref.strip())


def task_scores(name: str, tok, prompts, conts) -> dict:
    """The greedy outputs' task metric. Rows without a reference are left out and counted; with none at all the
    score is marked unavailable (a 0 would read as a result)."""
    if name not in TASK_METRIC:
        return {}
    keep = [i for i, p in enumerate(prompts) if _has_reference(p.reference)]
    missing = len(prompts) - len(keep)
    if not keep:
        return {"unavailable": f"no row has a reference ({missing} of {len(prompts)} empty or missing)",
                "references_missing": missing}
    prompts, conts = [prompts[i] for i in keep], [conts[i] for i in keep]
    out = _score(name, tok, prompts, conts)
    return {**out, "references_missing": missing} if missing else out


def _score(name: str, tok, prompts, conts) -> dict:
    metric = load_metric(TASK_METRIC[name])
    preds = [tok.decode(c, skip_special_tokens=True).strip() for c in conts]
    refs = [p.reference for p in prompts]
    if name == "squad":
        preds = [x.split("\n")[0] for x in preds]
        refs = [list(r) for r in refs]
    elif name == "wmt15":
        preds = [x.split("\n")[0] for x in preds]
    return metric.compute(predictions=preds, references=refs)


def timed_generation(model, ids: list[list[int]], max_new_tokens: int, batch_size: int,
                     capture_layers: list[int] | None, baseline: bool = True, progress=None,
                     capture_final: bool = False, first_batch: int = 0):
    """Greedy continuations of ``ids`` (keeping the states of ``capture_layers`` when given) and, with
    ``baseline``, the plain greedy generation of the same batches, timed beside it.

    Returns ``(continuations, states, seconds, plain_seconds)``. The two generations take turns batch by batch
    (which one goes first alternates), so a drift of the machine's speed falls on both alike instead of on
    whichever happened to run during it. They must produce the same tokens: the capture hooks only read."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # greedy_continuations' own batches
    conts: list = [None] * len(ids)
    states: list = [None] * len(ids)
    seconds = plain_seconds = 0.0
    for b, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s:s + batch_size]
        batch = [ids[i] for i in idx]
        kinds = ["ours", "plain"] if baseline else ["ours"]
        got, took = {}, {}
        for kind in (kinds if (first_batch + b) % 2 == 0 else kinds[::-1]):
            with stopwatch(model.device) as t:
                got[kind] = greedy_continuations(model, batch, max_new_tokens, batch_size=len(batch),
                                                 capture_layers=capture_layers if kind == "ours" else None,
                                                 capture_final=capture_final)
            took[kind] = t.seconds
            if progress is not None:
                progress.update(len(batch))
        seconds += took["ours"]
        plain_seconds += took.get("plain", 0.0)
        c, st = got["ours"] if capture_layers else (got["ours"], [{} for _ in batch])
        if baseline and got["plain"] != c:
            raise RuntimeError("the generation that captured the heads' states decoded other tokens than the plain "
                               "one; the capture hooks must only read (this is a bug in ppd_decode.evaluation.match_rate)")
        for r, i in enumerate(idx):
            conts[i], states[i] = c[r], st[r]
    return conts, states, seconds, plain_seconds


def measuring_cost_line(t: dict) -> str:
    both = (f"{t['measure_cost_vs_generation']:.2f}x the plain greedy generation of these prompts ({t['measure']}; "
            f"scoring is {t['score_cost_per_head_vs_generation']:.3f}x of it per head)")
    if not t.get("measure_cost_trained_vs_generation"):
        return f"Measuring all {t['heads_scored']} heads cost {both}."
    n = t["trained_heads_scored"]
    return (f"Measuring the {n} trained head{'s' if n != 1 else ''} cost {t['measure_cost_trained_vs_generation']:.2f}x "
            f"the plain greedy generation; with the logit-lens baselines beside them, all {t['heads_scored']} heads "
            f"cost {both}.")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device)
    L = model.config.num_hidden_layers
    heads = collect_heads(model, list(cfg.heads or []), list(cfg.lens_layers or []))
    ks = [int(k) for k in cfg.ks]
    match_metric = load_metric("match_rate")
    report = {"model": cfg.model.spec, "layers": L, "ks": ks, "heads": list(cfg.heads or []), "tasks": {},
              "n": cfg.n, "max_new_tokens": cfg.max_new_tokens}
    if cfg.measure == "capture":  # before any generation: the states it would capture would not do
        refuse_block_heads_for_capture(heads)
    rank, world, owned = _distributed(model)
    layers = sorted({d for _, d in heads})
    final = any(getattr(h, "reads_prev", False) for h in heads.values())  # f(t-1) is captured for such heads
    warmed = resumed = False
    for name, tcfg in cfg.tasks.items():
        task = TaskConfig.from_dict(tcfg)
        try:
            rows = load_task(task, n=cfg.n, source=cfg.source)
        except Exception as e:  # a missing data set is reported, never a silent number
            report["tasks"][name] = {"skipped": str(e)}
            print(f"[eval] skipping {name}: {e}")
            continue
        prompts, trunc = build_prompts(rows, tok, max_new_tokens=cfg.max_new_tokens,
                                       context_length=context_length(model))
        ids = [p.input_ids for p in prompts]
        if not warmed:  # the first task's timings would otherwise carry one-off start-up costs
            if cfg.measure == "capture":
                c, st = greedy_continuations(model, ids[:2], 4, batch_size=2, capture_layers=layers,
                                             capture_final=final)
                score_captured(model, heads, c, st, ks=ks)
            else:  # (block heads are scored teacher-forced only: warm that path)
                c = greedy_continuations(model, ids[:2], 4, batch_size=2)
                score_heads(model, heads, ids[:2], c, ks=ks)
            warmed = True
        if cfg.measure not in ("capture", "teacher_forced"):
            raise ValueError(f"measure={cfg.measure!r}; use capture or teacher_forced")
        done = _evaluate_batches(cfg, model, heads, name, ids, ks, layers, final, out_dir, rank, world)
        if world > 1:
            done = {b: part for parts in _all_gather(done) for b, part in parts.items()}
        batches = [done[b] for b in sorted(done)]  # one order whatever the ranks: the report is the same
        scores = merge_scores([part["scores"] for part in batches])
        conts = [None] * len(ids)
        for part in batches:
            for i, c in part["conts"].items():
                conts[i] = c
        t_gen, t_plain, t_score = (sum(part[k] for part in batches) for k in ("t_gen", "t_plain", "t_score"))
        stats = {"positions": sum(map(len, conts))}
        resumed |= any(part.get("resumed") for part in batches)
        if cfg.measure == "teacher_forced":
            stats["teacher_forced_disagreements"] = sum(part["disagreements"] for part in batches)
        cost = {"seconds_plain_generation": t_plain} if cfg.cost_baseline else {}
        base = cost.get("seconds_plain_generation", t_gen)
        # The trained heads are what is measured; the logit lens is the baseline scored beside them. Time outside
        # the per-head scoring (gathering the states) is charged to the trained heads.
        trained = [sc for sc in scores if sc.label != "lens"]
        t_trained = t_score - sum(sc.seconds for sc in scores if sc.label == "lens")
        cost.update({"seconds_generate": t_gen, "seconds_score_all_heads": t_score, "heads_scored": len(heads),
                     "trained_heads_scored": len(trained),
                     "measure_cost_vs_generation": (t_gen + t_score) / base,
                     "measure_cost_trained_vs_generation": (t_gen + t_trained) / base if trained else None,
                     "score_cost_per_head_vs_generation": t_score / len(heads) / base})
        rates = []
        for sc in scores:
            # Reported through the project's `evaluate` module; the tensor hit counts must say the same.
            res = match_metric.compute(predictions=torch.cat(sc.top).tolist(),
                                       references=torch.cat(sc.targets).tolist(), k=ks)
            assert all(abs(res[f"p@{k}"] - sc.rate(k)) < 1e-9 for k in ks), (res, sc.hits)
            rates.append({"head": sc.label, "layer": sc.layer, "positions": sc.positions,
                          "ranking": "shortlist" if _shortlisted(heads, sc) else "full",
                          "among_rows": _among_rows(heads, sc, torch.cat(sc.targets)),
                          **{f"p@{k}": res[f"p@{k}"] for k in ks},
                          **{f"full@{k}": sc.full_rate(k) for k in ks},
                          **({f"noprev@{k}": sc.noprev_rate(k) for k in ks} if sc.noprev_hits else {})})
        report["tasks"][name] = {
            "source": rows.source, "prompts": len(ids), "truncation": str(trunc), "positions": stats["positions"],
            "measure": cfg.measure, **{k: v for k, v in stats.items() if k != "positions"}, **cost,
            "process_seconds": t_gen + t_plain + t_score,
            "rates": rates, "task_scores": task_scores(name, tok, prompts, conts),
            "_scores": scores}
        print(f"[eval] {name}: {len(ids)} prompts, {stats['positions']} positions; measuring {len(heads)} heads "
              f"cost {cost['measure_cost_vs_generation']:.2f}x the plain generation; scores {report['tasks'][name]['task_scores']}")

    theory = latency_model(cfg, model, heads, report, ks) if cfg.timing.enabled and rank == 0 else {}
    report["theory"] = theory
    for t in report["tasks"].values():
        t.pop("_scores", None)
    report["time"] = time_division(report, world, time.perf_counter() - started, resumed)
    if model.device.type == "cuda":
        report["time"]["peak_device_memory_mib"] = torch.cuda.max_memory_allocated(model.device) / 2**20
    report["provenance"] = provenance("python -m ppd_decode.evaluation " + " ".join(map(shlex.quote, sys.argv[1:]))
                                      + (f" (under torchrun, {world} processes)" if world > 1 else ""), model.device)
    if rank == 0:  # every rank holds the whole report; one writes it
        write_report(report, out_dir, cfg)
        shutil.rmtree(out_dir / "partial", ignore_errors=True)  # the finished report replaces the partial ones
    if owned:  # a group this run created ends with it, every rank at once (a rank left talking could abort)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return report


PROJECTED_DEVICES = (1, 2, 8, 64)


def time_division(report: dict, world: int, wall_seconds: float, resumed: bool) -> dict:
    """The run's wall time and how its work divides over data-parallel processes.

    Every prompt's generation and scoring is timed inside the process that ran it; summed over processes and tasks
    that is the run's divisible work. The rest of the wall time (``other_seconds``: loading, warm-up, saving the
    partial results, waiting on the other processes, the latency model's timings) is not. Prompts
    share nothing, so N processes each as fast as one of this run's would take the divisible work / N, the per-
    prompt cost being the one measured here: a GPU's own cost is what this report measures when run on it."""
    tasks = [t for t in report["tasks"].values() if "process_seconds" in t]
    work = sum(t["process_seconds"] for t in tasks)
    prompts = sum(t["prompts"] for t in tasks)
    out = {"processes": world, "wall_seconds": wall_seconds, "resumed": resumed, "prompts": prompts,
           "process_seconds": work, "seconds_per_prompt": work / prompts if prompts else None,
           "divisible_seconds_on": {str(n): work / n for n in PROJECTED_DEVICES}}
    if not resumed:  # a resumed run's wall time covers only its last part
        out["other_seconds"] = max(0.0, wall_seconds - work / world)
    return out


def time_lines(tm: dict) -> list[str]:
    if not tm or not tm.get("prompts"):
        return []
    wall = f"{tm['wall_seconds'] / 60:.1f} min" + (" (the last part of a resumed run)" if tm["resumed"] else "")
    lines = ["## Time", "",
             f"{tm['prompts']} prompts on {tm['processes']} process{'es' if tm['processes'] != 1 else ''}: "
             f"{wall} wall. Generating and scoring took {tm['seconds_per_prompt']:.2f} s per prompt in one "
             f"process ({tm['process_seconds'] / 3600:.2f} process-hours in all)"
             + (f"; the rest of the wall time (loading, warm-up, saving partial results, waiting on the other "
                f"processes, the stage timings) {tm['other_seconds'] / 60:.1f} min" if "other_seconds" in tm else "")
             + ".", "",
             "The prompts are independent, so data-parallel processes divide that work; at this per-prompt cost "
             "(a GPU has its own, which this report measures when run there):", "",
             "| processes | " + " | ".join(tm["divisible_seconds_on"]) + " |",
             "|---|" + "---|" * len(tm["divisible_seconds_on"]),
             "| hours | " + " | ".join(f"{s / 3600:.2f}" for s in tm["divisible_seconds_on"].values()) + " |", ""]
    return lines


def _distributed(model) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group): under torchrun each rank evaluates every
    world-th batch of prompts (gloo on CPUs, NCCL on GPUs); a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if model.device.type == "cuda" else "gloo")
    return dist.get_rank(), world, owned


def _save(obj, path: Path) -> None:
    """Written whole or not at all (a file is complete once its name appears)."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _all_gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _evaluate_batches(cfg, model, heads, name, ids, ks, layers, final, out_dir: Path, rank: int,
                      world: int) -> dict:
    """This rank's batches of one task (every world-th, longest prompts first), each generated with the heads'
    states captured and scored at once, so only counts and small per-position records are kept (never the hidden
    states of a whole task). Every batch's result is saved under ``out_dir/partial/``: a run started again with the
    same run directory (``hydra.run.dir=...``) resumes with the batches not saved yet."""
    from tqdm import tqdm

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # greedy_continuations' order
    groups = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    mine = [b for b in range(len(groups)) if b % world == rank]
    key = {"task": name, "ids": [len(x) for x in ids], "heads": sorted(f"{lab}@{d}" for lab, d in heads),
           "ks": list(ks), "max_new_tokens": cfg.max_new_tokens, "measure": cfg.measure,
           "batch_size": cfg.batch_size, "world": world, "cost_baseline": bool(cfg.cost_baseline)}
    # One file per batch (appending costs the same at the last batch as at the first), and the settings they
    # belong to beside them.
    folder = out_dir / "partial" / f"{name}.rank{rank}"
    done: dict = {}
    if (folder / "key.pt").is_file():
        if torch.load(folder / "key.pt", weights_only=False) != key:
            raise PPDError(f"{folder} is a partial evaluation with other settings; it cannot be resumed with these. "
                           f"Fix: use a new run directory, or delete {folder.parent}")
        for f in sorted(folder.glob("batch*.pt")):
            done[int(f.stem[5:])] = {**torch.load(f, weights_only=False), "resumed": True}
        print(f"[eval] {name}: resuming after {len(done)} of {len(mine)} batches ({folder})")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _save(key, folder / "key.pt")
    capture = layers if cfg.measure == "capture" else None
    bar = tqdm(total=len(mine), initial=len(done), desc=f"{name}: generate + score", unit="batch",
               dynamic_ncols=True, disable=rank != 0)
    stop = cfg.get("debug_stop_after_batches")
    for n_run, b in enumerate(x for x in mine if x not in done):
        if stop is not None and n_run >= int(stop):
            raise RuntimeError(f"debug_stop_after_batches={stop}: stopped after {n_run} batches (fault injection)")
        idx = groups[b]
        batch = [ids[i] for i in idx]
        conts, states, t_gen, t_plain = timed_generation(model, batch, cfg.max_new_tokens, len(batch), capture,
                                                         baseline=cfg.cost_baseline, capture_final=final,
                                                         first_batch=b)
        part = {"conts": dict(zip(idx, conts)), "t_gen": t_gen, "t_plain": t_plain}
        with stopwatch(model.device) as t:
            if capture:
                part["scores"] = score_captured(model, heads, conts, states, ks=ks, keep_top=True)
            else:
                part["scores"], st = score_heads(model, heads, batch, conts, ks=ks, keep_top=True,
                                                 batch_size=max(1, cfg.batch_size // 2))
                part["disagreements"] = st["teacher_forced_disagreements"]
        part["t_score"] = t.seconds
        done[b] = part
        _save(part, folder / f"batch{b:06d}.pt")
        bar.update(1)
    bar.close()
    return done


def latency_model(cfg, model, heads, report, ks) -> dict:
    L = model.config.num_hidden_layers
    layers = sorted({d for _, d in heads})
    timings = {}
    for d in layers:
        # Timed with a trained head where there is one: it guesses from its shortlist (see EarlyExitHead.guess), a
        # twelfth of the lens's full projection on SmolLM2, and that is the head PPD runs with.
        head = next((h for (label, layer), h in heads.items() if layer == d and label != "lens"), heads[("lens", d)])
        st = measure_stage_times(model, head, d, ks=ks, context=cfg.timing.context, repeats=cfg.timing.repeats)
        timings[d] = st
    out = {"timings": {d: {"t1": st.t1, "t1_miss": st.t1_miss, "t2": st.t2, "greedy": st.greedy, "head": st.head, "layer": st.layer}
                       for d, st in timings.items()}, "predictions": [], "best": {}}
    for name, t in report["tasks"].items():
        if "_scores" not in t:
            continue
        best = None
        for sc in t["_scores"]:
            st = timings[sc.layer]
            outcomes = torch.cat(sc.outcomes)
            for j, k in enumerate(ks):
                p = sc.rate(k)
                sp = stage_pipelined(p, st.t1[k], st.t1_miss, st.t2, st.greedy)
                seq = outcomes[:, j].tolist()
                sim = simulate_stage_pipelined(seq, st.t1[k], st.t1_miss, st.t2)
                rp = replicated(p, sc.layer, L, k)
                rsim, _ = simulate_replicated(seq, sc.layer, L, k)
                row = {"task": name, "head": sc.label, "layer": sc.layer, "k": k, "p": p,
                       "pipelined_speedup": sp["speedup"], "pipelined_extra_compute": sp["extra_compute"],
                       "pipelined_sim_vs_closed": sim / sp["latency"],
                       "replicated_speedup": rp["speedup"], "replicated_extra_compute": rp["extra_compute"],
                       "replicated_sim_vs_closed": rsim / rp["latency"] if sc.layer >= L / 2 else None}
                out["predictions"].append(row)
                if best is None or row["pipelined_speedup"] > best["pipelined_speedup"]:
                    best = row
        out["best"][name] = best
    return out


def write_report(report: dict, out_dir: Path, cfg) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "match_rate.json").write_text(json.dumps(report, indent=1, default=str))
    ks = report["ks"]
    with (out_dir / "match_rate.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "head", "layer", "positions", *[f"p@{k}" for k in ks]])
        for name, t in report["tasks"].items():
            for r in t.get("rates", []):
                w.writerow([name, r["head"], r["layer"], r["positions"], *[f"{r[f'p@{k}']:.4f}" for k in ks]])
    per_task = "every row of each task" if report["n"] is None else f"{report['n']} prompts per task"
    lines = [f"# Match rates, {report['model']} ({per_task}, up to {report['max_new_tokens']} greedy tokens each)", ""]
    pv = report.get("provenance")
    if pv:
        lines += [f"`{pv['command']}`; {pv['date']}, {pv['machine']['cpu']} ({pv['machine']['cores']} cores"
                  + (f", {pv['machine']['gpu']}" if pv["machine"].get("gpu") else "") + f"), commit {pv['commit']}.", ""]
    for name, t in report["tasks"].items():
        if "skipped" in t:
            lines += [f"## {name}: skipped ({t['skipped']})", ""]
            continue
        ts = t["task_scores"]
        scored = ", ".join(f"{k} {v:.1f}" for k, v in ts.items() if isinstance(v, float))
        if "unavailable" in ts:
            scored = f"unavailable: {ts['unavailable']}"
        elif ts.get("references_missing"):
            scored += f"; {ts['references_missing']} rows without a reference left out"
        lines += [f"## {name} ({t['prompts']} prompts, {t['positions']} positions; task scores of the greedy "
                  f"output: {scored})",
                  "", measuring_cost_line(t), "",
                  "p@k ranks the way decoding does (a head trained on frequent rows guesses from those rows; a head "
                  "that reads f(t-1) is given it wherever the stage-pipelined deployment has it: every position but "
                  "the first); then p@1 over the full vocabulary, and p@1 of a head that reads f(t-1) never given "
                  "it (as for self-speculation's later draft tokens); last, how often the greedy token is among the "
                  "rows the head ranks at all (its shortlist), which no p@k can exceed.", "",
                  "| head | layer | ranking | " + " | ".join(f"p@{k}" for k in ks) + " | p@1 full vocab | "
                  "p@1 without f(t-1) | among its rows |", "|---|---|---|" + "---|" * len(ks) + "---|---|---|"]
        for r in sorted(t["rates"], key=lambda r: (r["layer"], r["head"] != "lens", r["head"])):
            alone = f"{r['noprev@1']:.3f}" if "noprev@1" in r else "-"
            lines.append(f"| {r['head']} | {r['layer']} | {r.get('ranking', 'full')} | "
                         + " | ".join(f"{r[f'p@{k}']:.3f}" for k in ks)
                         + f" | {r.get('full@1', r['p@1']):.3f} | {alone} | {r.get('among_rows', 1.0):.3f} |")
        best = report.get("theory", {}).get("best", {}).get(name)
        if best:
            lines += ["", f"Best predicted stage-pipelined setting: head {best['head']} at d={best['layer']}, "
                          f"k={best['k']}: speedup {best['pipelined_speedup']:.2f}x over greedy at "
                          f"{100 * best['pipelined_extra_compute']:.0f}% extra compute (p={best['p']:.3f})."]
        lines.append("")
    tm = report.get("theory", {}).get("timings")
    if tm:
        lines += ["## Stage timings measured here (ms)", "", "| d | T1(1) | T1(k max) | T2 | greedy step | early head |",
                  "|---|---|---|---|---|---|"]
        for d, t in tm.items():
            kmax = max(t["t1"])
            lines.append(f"| {d} | {1e3 * t['t1'][1]:.2f} | {1e3 * t['t1'][kmax]:.2f} (k={kmax}) | "
                         f"{1e3 * t['t2']:.2f} | {1e3 * t['greedy']:.2f} | {1e3 * t['head']:.2f} |")
    lines += ["", *time_lines(report.get("time"))]
    (out_dir / "match_rate.md").write_text("\n".join(lines) + "\n")
    plot(report, out_dir)
    if cfg.get("publish"):
        docs = REPO / "docs" / "benchmarks"
        docs.mkdir(parents=True, exist_ok=True)
        name = cfg.get("name") or "match_rate"
        for suffix in ("json", "csv", "md"):
            (docs / f"{name}.{suffix}").write_text((out_dir / f"match_rate.{suffix}").read_text())
        for png in out_dir.glob("*.png"):
            stem = png.name.replace("match_rate", name, 1) if png.name.startswith("match_rate") else f"{name}_{png.name}"
            (docs / stem).write_bytes(png.read_bytes())
    log_wandb(report, out_dir, cfg)
    print((out_dir / "match_rate.md").read_text())


def plot(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [n for n, t in report["tasks"].items() if "rates" in t]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        rates = report["tasks"][name]["rates"]
        for head in sorted({r["head"] for r in rates}):
            rs = sorted((r for r in rates if r["head"] == head), key=lambda r: r["layer"])
            for k, style in ((1, "-"), (5, "--")):
                ax.plot([r["layer"] for r in rs], [r[f"p@{k}"] for r in rs], style, marker="o", label=f"{head} p@{k}")
        ax.set_title(name)
        ax.set_xlabel("layer d")
        ax.set_ylabel("match rate")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "match_rate_vs_layer.png", dpi=110)
    preds = report.get("theory", {}).get("predictions", [])
    if preds:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, name in zip(axes[0], tasks):
            for head in sorted({p["head"] for p in preds if p["task"] == name}):
                ps = [p for p in preds if p["task"] == name and p["head"] == head]
                ax.scatter([100 * p["pipelined_extra_compute"] for p in ps], [p["pipelined_speedup"] for p in ps],
                           s=12, label=head)
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_title(f"{name}: stage-pipelined, every (d, k)")
            ax.set_xlabel("extra compute (%)")
            ax.set_ylabel("predicted speedup over greedy")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "speedup_vs_compute.png", dpi=110)


def log_wandb(report: dict, out_dir: Path, cfg) -> None:
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out_dir), job_type="eval",
                     config=OmegaConf.to_container(cfg, resolve=True))
    ks = report["ks"]
    table = wandb.Table(columns=["task", "head", "layer", *[f"p@{k}" for k in ks]])
    for name, t in report["tasks"].items():
        for r in t.get("rates", []):
            table.add_data(name, r["head"], r["layer"], *[r[f"p@{k}"] for k in ks])
    run.log({"match_rates": table, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in out_dir.glob("*.png")}})
    run.finish()


def main(cfg: DictConfig) -> None:
    """The Hydra job (``python -m ppd_decode.evaluation``, whose ``__main__`` holds the ``hydra.main`` entry)."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    print(f"[eval] writing to {out_dir}; an interrupted evaluation resumes with hydra.run.dir={out_dir}")
    run(cfg, out_dir)
