"""`onestep demo`: a Direct Model trained on the embedded digits and evaluated against its
quality bar; with `--method slimflow` a SlimFlow student of its flow after it, with `--method
slt` (a deep Direct Model) a Single-Layer Transformer distilled from its one-step map and noise
screening with a screening SLT. Each stage prints its bars as PASS/FAIL; the exit code is 1 when
one fails.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from onestep_models import recipes, screening_run
from onestep_models.evaluation import evaluate, print_table
from onestep_models.runs import load_run, report_training, sample_shape, train_run
from onestep_models.slimflow_run import train_slimflow
from onestep_models.train import (
    TrainConfig,
    grid_inputs,
    latest_checkpoint,
    write_json_atomic,
)

# The demo's settings: measured to finish (training + evaluation) in well under 10 minutes on
# 2 CPU cores and to meet the quality bar; see README "Direct Models on digits".
DEMO = dict(model="tiny", steps=3000, batch_size=128, lr=1e-3, warmup_steps=200, grad_clip=1.0,
            ema_decay=0.999, dt=0.05, eval_samples=1000)


# The SlimFlow demo's settings (after the Direct Models demo, whose flow is the teacher).
SLIMFLOW_DEMO = dict(num_pairs=4000, heun_steps=16, steps=3000, anneal_steps=1500,
                     distill_steps=1000, student="slim-32", batch_size=128, lr=2e-3)


# The SLT demo's settings: the Direct Model of the demo at the "deep" size is the teacher.
SLT_DEMO = dict(teacher="deep", student="slt-tiny", screener="slt-screen-tiny", steps=2000,
                batch_size=128, lr=2e-3, patches=4)


def slimflow_demo(args, device: torch.device, direct: dict[str, Any]) -> bool:
    """SlimFlow after the Direct Models demo: the demo's flow v is the teacher; a student with
    about 1/4 of its parameters is trained in both stages into <out>/slimflow, evaluated, and
    checked against the bars (printed as PASS/FAIL); True when all pass."""
    from onestep_models import slimflow as sf

    # the demo's settings; a shorter direct demo (--steps below its default) scales them down
    scale = min(1.0, args.steps / DEMO["steps"])
    d = dict(SLIMFLOW_DEMO)
    for key, least in (("steps", 1), ("anneal_steps", 0), ("distill_steps", 1),
                       ("num_pairs", 64)):
        d[key] = max(least, round(SLIMFLOW_DEMO[key] * scale))
    tcfg = TrainConfig(steps=d["steps"], batch_size=d["batch_size"], lr=d["lr"],
                       warmup_steps=100, grad_clip=1.0, ema_decay=0.999, seed=args.seed,
                       checkpoint_every=max(1, d["steps"] // 4),
                       log_every=max(1, min(100, d["steps"] // 10)))
    start = time.perf_counter()
    dirs = train_slimflow(args.out / "slimflow", tcfg, device, teacher=args.out,
                          num_pairs=d["num_pairs"], heun_steps=d["heun_steps"], stage="both",
                          student=d["student"], anneal_steps=d["anneal_steps"],
                          schedule="linear", hflip=False, guidance=True,
                          distill_steps=d["distill_steps"], **_training(args))
    result = {"reflow": evaluate(dirs["reflow"], args.eval_samples, 1, device),
              "distill": evaluate(dirs["distill"], args.eval_samples, 1, device)}
    teacher, _, _ = recipes.load_teacher(args.out)
    student_model, _, _ = load_run(dirs["distill"], torch.device("cpu"))
    shape = (1, 1, 8, 8)
    x, t, y = torch.zeros(shape), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
    sizes = {name: {"parameters": sum(p.numel() for p in net.parameters()),
                    "macs_per_image": sf.count_macs(net, x, t, y)}
             for name, net in (("teacher", teacher.cpu()), ("student", student_model.v))}
    fd = {"student_1step": result["distill"]["samplers"]["slimflow_1step"]["digits_fd"],
          "reflow_1step": result["reflow"]["samplers"]["slimflow_1step"]["digits_fd"],
          "teacher_euler_1step": direct["samplers"]["flow_euler_1step"]["digits_fd"],
          "direct_1step": direct["samplers"]["direct_1step"]["digits_fd"]}
    bars = {
        "student parameters <= 1/4 of the teacher's":
            sizes["student"]["parameters"] <= sizes["teacher"]["parameters"] / 4,
        "student FD <= 1/3 of the teacher's 1-step Euler FD":
            fd["student_1step"] <= fd["teacher_euler_1step"] / 3,
        "student FD <= 2x the Direct Model's 1-step FD":
            fd["student_1step"] <= 2 * fd["direct_1step"],
        "annealing-reflow student straighter than the teacher":
            result["reflow"]["straightness_euler128"] < direct["straightness_euler128"],
    }
    summary = {"sizes": sizes, "digits_fd": fd, "bars": bars,
               "straightness": {"teacher": direct["straightness_euler128"],
                                "reflow_student": result["reflow"]["straightness_euler128"]},
               "stages": result, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(args.out / "slimflow" / "metrics.json", summary)
    print(f"SlimFlow: student {sizes['student']['parameters']:,} parameters, "
          f"{sizes['student']['macs_per_image']:,} MACs/image; teacher "
          f"{sizes['teacher']['parameters']:,}, {sizes['teacher']['macs_per_image']:,}")
    print("digits-FD: " + ", ".join(f"{k} {v:.4g}" for k, v in fd.items()))
    for what, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"SlimFlow in {summary['seconds']:.0f} s; metrics in {args.out / 'slimflow'}")
    return all(bars.values())


def slt_demo(args, device: torch.device, direct: dict[str, Any]) -> bool:
    """The SLT after the Direct Models demo at the deep size: its one-step map (w at t = 1) is
    the teacher; an SLT is distilled into <out>/slt (data-free), evaluated, its per-patch
    cosine similarity to the teacher's states measured, and checked against the bars (printed
    as PASS/FAIL); True when all pass."""
    from onestep_models.run_dir import load_weights

    scale = min(1.0, args.steps / DEMO["steps"])
    steps = max(1, round(SLT_DEMO["steps"] * scale))
    out = args.out / "slt"
    options = {**recipes.default_options("slt"), "patches": SLT_DEMO["patches"]}
    run, dataset, num_classes = recipes.slt_run_config(args.out, SLT_DEMO["student"], True,
                                                       options)
    tcfg = TrainConfig(steps=steps, batch_size=SLT_DEMO["batch_size"], lr=SLT_DEMO["lr"],
                       warmup_steps=100, grad_clip=1.0, ema_decay=0.999, seed=args.seed,
                       checkpoint_every=max(1, steps // 4), log_every=max(1, min(100, steps // 10)))
    start = time.perf_counter()
    trainer = train_run(run, dataset, num_classes, tcfg, out, device, **_training(args))
    report_training(trainer, tcfg, out, time.perf_counter() - start)
    result = evaluate(out, args.eval_samples, 1, device)
    # per-patch cosine similarity of the SLT's (EMA) states to the teacher's, on fixed noise
    recipe = recipes.build(run).to(device).eval()
    load_weights(recipe, latest_checkpoint(out), "ema")
    x0, y = grid_inputs(sample_shape(run), num_classes, args.eval_samples, 1, device)
    with torch.no_grad():
        cosines = recipe.patch_cosines(x0, y)
    teacher_parameters = sum(p.numel() for p in recipe._teacher.net.parameters())
    slt_parameters = sum(p.numel() for p in recipe.student.parameters() if p.requires_grad)
    slt, teacher = result["samplers"]["slt_1step"], direct["samplers"]["direct_1step"]
    bars = {
        "SLT parameters <= 1/4 of the teacher's": slt_parameters <= teacher_parameters / 4,
        "SLT 1-step FD <= 2x the teacher's 1-step FD": slt["digits_fd"] <= 2 * teacher["digits_fd"],
        "SLT class accuracy within 3 points of the teacher's":
            slt["class_accuracy"] >= teacher["class_accuracy"] - 0.03,
    }
    summary = {"parameters": {"slt": slt_parameters, "teacher": teacher_parameters},
               "digits_fd": {"slt_1step": slt["digits_fd"], "teacher_1step": teacher["digits_fd"]},
               "class_accuracy": {"slt_1step": slt["class_accuracy"],
                                  "teacher_1step": teacher["class_accuracy"]},
               "patch_cosines": cosines, "bars": bars, "slt": result,
               "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(out / "metrics.json", summary)
    print(f"SLT: {slt_parameters:,} parameters (teacher {teacher_parameters:,}); 1-step "
          f"digits-FD {slt['digits_fd']:.4g} (teacher {teacher['digits_fd']:.4g}), accuracy "
          f"{slt['class_accuracy']:.3f} (teacher {teacher['class_accuracy']:.3f}); per-patch "
          f"cosine similarity " + ", ".join(f"{c:.3f}" for c in cosines))
    for what, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"SLT in {summary['seconds']:.0f} s; metrics in {out}")
    return screening_demo(args, device, tcfg) and all(bars.values())


def screening_demo(args, device: torch.device, tcfg: TrainConfig) -> bool:
    """Noise screening after the SLT demo: a screening SLT (slt-screen-tiny: 4 tokens, K = 2,
    the time budget's design scaled to the digits) distilled from the same teacher into
    <out>/screen with the SLT's settings, then the teacher sampled from screened noise at
    N = 1 (random), 8, 32, 128 and judged (screening_run.screening_table); the table, its
    bars (PASS/FAIL) and screening.png. True when all pass."""
    out = args.out / "screen"
    options = recipes.default_options("slt")  # (K = 2 applications: P = 2 patches)
    run, dataset, num_classes = recipes.slt_run_config(args.out, SLT_DEMO["screener"], True,
                                                       options)
    start = time.perf_counter()
    trainer = train_run(run, dataset, num_classes, tcfg, out, device, **_training(args))
    report_training(trainer, tcfg, out, time.perf_counter() - start)
    scale = min(1.0, tcfg.steps / SLT_DEMO["steps"])  # (--steps below the default: a smoke run)
    distillation = {key: max(64, round(value * scale))
                    for key, value in screening_run.PREVIEW_DISTILLATION.items()}
    pieces = screening_run.load_screening(args.out, out, device, "preview",
                                          distillation=distillation)
    table = screening_run.screening_table(pieces, device,
                                          per_class=max(5, args.eval_samples // 10))
    bars = screening_run.screening_bars(table)
    screening_run.plot_screening_table(table, out / "screening.png")
    summary = {**table, "bars": bars, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(out / "metrics.json", summary)
    screening_run.print_screening_table(table)
    for what, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    print(f"noise screening in {summary['seconds']:.0f} s; table, screening.png and "
          f"metrics.json in {out}")
    return all(bars.values())


def quality_bar(result: dict[str, Any]) -> dict[str, Any]:
    """The Direct Models bar on digits: 1-step w's digits-FD at most 1/3 of 1-step Euler flow's;
    its class accuracy at least 80% of the 128-step flow's."""
    s = result["samplers"]
    direct, euler1, euler128 = s["direct_1step"], s["flow_euler_1step"], s["flow_euler_128step"]
    fd_ratio = direct["digits_fd"] / euler1["digits_fd"]
    acc_ratio = direct["class_accuracy"] / max(euler128["class_accuracy"], 1e-12)
    return {"fd_ratio_direct_over_euler1": fd_ratio, "fd_ratio_ok": fd_ratio <= 1 / 3,
            "accuracy_ratio_direct_over_euler128": acc_ratio, "accuracy_ratio_ok": acc_ratio >= 0.8}


def _training(args) -> dict:
    return {"progress": not args.no_progress, "allow_config_change": args.allow_config_change,
            "allow_data_change": args.allow_data_change}


def run(args, device: torch.device) -> int:
    from onestep_models.cli.arguments import check_output_dir

    check_output_dir(args.out, "--out")
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=DEMO["warmup_steps"], grad_clip=DEMO["grad_clip"],
                       ema_decay=DEMO["ema_decay"], seed=args.seed,
                       checkpoint_every=max(1, args.steps // 4),
                       log_every=max(1, min(100, args.steps // 10)),
                       skip_nonfinite=args.skip_nonfinite)
    run_cfg, dataset, num_classes = recipes.run_config(
        "direct", {"kind": "digits", "size": 8},
        SLT_DEMO["teacher"] if args.method == "slt" else DEMO["model"], True,
        {**recipes.default_options("direct"), "dt": DEMO["dt"]})
    start = time.perf_counter()
    trainer = train_run(run_cfg, dataset, num_classes, tcfg, args.out, device,
                        **_training(args), compile=args.compile)
    report_training(trainer, tcfg, args.out, time.perf_counter() - start)
    if trainer.rank != 0:
        return 0
    trained = time.perf_counter() - start
    result = evaluate(args.out, args.eval_samples, 1, device)
    result["quality_bar"] = quality_bar(result)
    result["train_seconds"] = round(trained, 1)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(args.out / "metrics.json", result)
    print_table(result)
    bar = result["quality_bar"]
    verdict = {True: "PASS", False: "FAIL"}
    print(f"{verdict[bar['fd_ratio_ok']]}: direct 1-step FD / Euler 1-step FD = "
          f"{bar['fd_ratio_direct_over_euler1']:.3f} (bar: <= 0.333)\n"
          f"{verdict[bar['accuracy_ratio_ok']]}: direct 1-step accuracy / Euler "
          f"128-step accuracy = {bar['accuracy_ratio_direct_over_euler128']:.3f} "
          f"(bar: >= 0.8)\n"
          f"grids and metrics.json in {args.out}; {result['total_seconds']:.0f} s in all")
    passed = bar["fd_ratio_ok"] and bar["accuracy_ratio_ok"]
    if args.method == "slimflow":
        passed = slimflow_demo(args, device, result) and passed
    if args.method == "slt":
        passed = slt_demo(args, device, result) and passed
    return 0 if passed else 1
