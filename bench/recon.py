"""Reconstruction table: full precision, rtn, repq and the reconstruction methods on
dinov2-s14-fmnist at a given budget.

    python bench/recon.py [--settings 4/4,3/3] [--budget cpu] [--eval-size 2000]
                          [--methods rtn,repq,brecq,qdrop,pfcr,pfcr-nopos,mgrq]

    python bench/recon.py --settings 3/3 --methods pfcr-level0,pfcr-carry1 --name pfcr_ablation

Runs `fastquant quantize` once per (method, setting) with --json (`pfcr-nopos` is
`--method pfcr --no-pos`; the other PFCR variants in VARIANTS add `--recon-set` options), keeps each run's JSON in bench/results/runs/ and reuses it on a
rerun (delete it to measure again; `--table-only` runs nothing); a reconstruction
stopped part-way resumes from its state in bench/results/state/ (the quantize time then
counts only the resumed part: the JSON's `recon_resumed_from` says so). Then it writes bench/results/recon_<model>_<budget>[_<name>].json
and prints a Markdown table with each row's budget, steps per unit and wall time.

Reused runs keep the defaults they ran with: the committed `brecq`, `qdrop`, `pfcr`,
`pfcr-nopos` and `mgrq` runs used `lr_act` 4e-5, the `pfcr` ones also the paper's PFCR
settings (POS, QDrop 0.5, `carry=0.5`, `anneal=unit`), and the `repq` runs no fc2
smoothing (the defaults then; each JSON's `recon_config` / `config` says so). Delete a
run's JSON to measure it with today's defaults.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Rows that are a method plus extra options: the PFCR ablations and the accuracy hypotheses
# (docs/methods.md). "lract": activation steps at 4e-5 * 20000 / 300, as lr_round is scaled
# for short runs ("lract10": 1e-2); "float": the unit's biases and LayerNorm affine trained
# too; "cos": the activation steps' learning rate on a half cosine to 0; "decay": QDrop's
# probability falling linearly to 0; "smooth": fc2's per-channel input ranges moved into its
# weights (--fc2-smooth, alpha 1; "smooth05": alpha 0.5).
LRACT = ["--recon-set", "lr_act=2.7e-3"]
SMOOTH = ["--fc2-smooth", "1.0"]
FLOAT = ["--recon-set", "lr_bias=1e-3", "--recon-set", "lr_norm=1e-4"]
COS = ["--recon-set", "lr_schedule=cosine"]
DECAY = ["--recon-set", "qdrop_schedule=linear"]
# PFCR's settings from the paper (its defaults until measured otherwise; with --no-pos,
# PAPER_NOPOS, since --recon-set is applied after --no-pos).
PAPER_NOPOS = ["--recon-set", "qdrop_p=0.5", "--recon-set", "carry=0.5", "--recon-set", "anneal=unit"]
PAPER = ["--recon-set", "pos=True"] + PAPER_NOPOS
HEAD = ["--recon-set", "w_head=1.0"]
NODROP, CARRY1 = ["--recon-set", "qdrop_p=0.0"], ["--recon-set", "carry=1.0"]
# MGRQ's terms at the paper's weight 1 (its defaults until they measured worse than 0.1);
# MGRQ_PAPER also with lr_act 4e-5, MGRQ's default then.
# Every MGRQ row before mgrq-edge-fisher1-lract took the global term as the KL divergence
# through the rest (KL: global_form=kl, its default then).
KL = ["--recon-set", "global_form=kl"]
# MGRQ's Fisher-form weights averaged over the calibration images (its default since
# mgrq-edge-fisherpool-lract; the rows name it so that they keep reproducing if it changes)
POOL = ["--recon-set", "fisher_pool=images"]
GPTQ_START = ["--recon-set", "round_start=gptq"]
MGRQ_W1 = ["--recon-set", "w_global=1.0", "--recon-set", "w_local=1.0"] + KL
MGRQ_PAPER = MGRQ_W1 + ["--recon-set", "lr_act=4e-5"]
VARIANTS = {
    "repq-smooth05": ("repq", ["--fc2-smooth", "0.5"]),
    "repq-smooth": ("repq", SMOOTH),
    "brecq-lract-smooth": ("brecq", LRACT + SMOOTH),
    "brecq-lract": ("brecq", LRACT),
    "brecq-lract-seed1": ("brecq", LRACT + ["--seed", "1"]),  # another calibration set and batch order
    "brecq-lract-float": ("brecq", LRACT + FLOAT),
    "brecq-lract-cos": ("brecq", LRACT + COS),
    "brecq-lract10": ("brecq", ["--recon-set", "lr_act=1e-2"]),
    # Steps per unit (the plot of top-1 against steps): lr_act scaled with the steps (None).
    "brecq-auto-it100": ("brecq", ["--iters", "100", "--recon-set", "lr_act=None"]),
    "brecq-auto": ("brecq", ["--recon-set", "lr_act=None"]),
    "brecq-auto-it1000": ("brecq", ["--iters", "1000", "--recon-set", "lr_act=None"]),
    "pfcr-auto-it100": ("pfcr", ["--iters", "100", "--recon-set", "lr_act=None"] + PAPER + NODROP + CARRY1),
    "pfcr-auto-it1000": ("pfcr", ["--iters", "1000", "--recon-set", "lr_act=None"] + PAPER + NODROP + CARRY1),
    # PFCR with today's defaults at 100 and 1,000 steps per unit (300: pfcr-lract).
    "pfcr-auto-it100-defaults": ("pfcr", ["--iters", "100", "--recon-set", "lr_act=None"]),
    "pfcr-auto-it1000-defaults": ("pfcr", ["--iters", "1000", "--recon-set", "lr_act=None"]),
    # Linear inputs quantized per token at run time (dynamic steps) instead of one calibrated
    # step per tensor: how much of the remaining error is the activations' granularity.
    "brecq-lract-pertoken": ("brecq", LRACT + ["--per-token"]),
    "pfcr-lract-pertoken": ("pfcr", LRACT + ["--per-token"]),
    # The activation steps' MSE search also trying the zero points that keep each input's
    # minimum (QuantConfig.zero_point_search, the default since these rows): the same commands
    # as the rows without "-zp", which ran before it and are reproduced with --no-zero-point-search.
    "repq-smooth-zp": ("repq", SMOOTH),
    "brecq-lract-zp": ("brecq", LRACT),
    "brecq-lract-zp-seed1": ("brecq", LRACT + ["--seed", "1"]),
    "pfcr-lract-zp": ("pfcr", LRACT),
    "pfcr-lract-zp-seed1": ("pfcr", LRACT + ["--seed", "1"]),
    "qdrop-lract-zp": ("qdrop", LRACT),
    "mgrq-zp": ("mgrq", MGRQ_PAPER),
    # The patch embedding and the classifier rounded with GPTQ (QuantConfig.edge_rounding, the
    # default since these rows; --edge-rounding nearest reproduces the "-zp" rows above).
    "repq-smooth-edge": ("repq", SMOOTH),
    "brecq-lract-edge": ("brecq", LRACT),
    "brecq-lract-edge-seed1": ("brecq", LRACT + ["--seed", "1"]),
    "qdrop-lract-edge": ("qdrop", LRACT),
    "qdrop-lract-edge-seed1": ("qdrop", LRACT + ["--seed", "1"]),
    "pfcr-lract-edge": ("pfcr", LRACT),
    "pfcr-lract-edge-seed1": ("pfcr", LRACT + ["--seed", "1"]),
    "mgrq-edge": ("mgrq", MGRQ_PAPER),
    # the global term through the float rest of the model (the later blocks are not
    # reconstructed yet when a block trains), with the activation steps' rate scaled
    "mgrq-edge-rfloat-lract": ("mgrq", MGRQ_W1 + LRACT + ["--recon-set", "global_rest=float"]),
    # MGRQ's two terms at a tenth of their weight on QDrop with the scaled lr_act: each term
    # alone raised block 9's output error by 16-48% (bench/unit_compare.py rows mgrq_w4a4_*)
    "mgrq-edge-small-lract": ("mgrq", LRACT + KL + ["--recon-set", "w_global=0.1", "--recon-set", "w_local=0.1"]),
    # one term at a time, at 0.1 (the other off)
    "mgrq-edge-global01-lract": ("mgrq", LRACT + KL + ["--recon-set", "w_global=0.1", "--recon-set", "w_local=0.0"]),
    "mgrq-edge-local01-lract": ("mgrq", LRACT + ["--recon-set", "w_global=0.0", "--recon-set", "w_local=0.1"]),
    # the global term at a hundredth: local alone (local01) beat both terms at 0.1 (small)
    "mgrq-edge-g001-lract": ("mgrq", LRACT + KL + ["--recon-set", "w_global=0.01", "--recon-set", "w_local=0.1"]),
    # BRECQ at PFCR's wall time with today's calibration: PFCR spends about 900 block steps'
    # worth per block (its halves, blocks and pairs at 300 steps each), lr_act scaled (None)
    "brecq-edge-it900": ("brecq", ["--iters", "900", "--recon-set", "lr_act=None"]),
    # MGRQ's global term in its second-order form (global_form=fisher: the block's squared
    # error weighted by the float model's diagonal Fisher information, computed once per
    # block) at the block loss's weight, beside the local term at its default 0.1
    "mgrq-edge-fisher1-lract": ("mgrq", LRACT + ["--recon-set", "global_form=fisher", "--recon-set", "w_global=1.0",
                                                "--recon-set", "fisher_pool=none"]),
    "qdrop-lract": ("qdrop", LRACT),
    "qdrop-lract-decay": ("qdrop", LRACT + DECAY),
    "mgrq-lract": ("mgrq", MGRQ_W1 + LRACT),
    "mgrq-nodrop-lract": ("mgrq", MGRQ_W1 + LRACT + NODROP),  # MGRQ's terms on BRECQ
    "pfcr-lract-nodrop-carry1": ("pfcr", LRACT + PAPER + NODROP + CARRY1),
    # The rounding stays soft through the fine levels, turning hard at the last one.
    "pfcr-lract-nodrop-anneal": ("pfcr", LRACT + PAPER + NODROP + CARRY1 + ["--recon-set", "anneal=levels"]),
    # Without POS (its weights_first stage trains the rounding with float activations and
    # leaves the activation steps half the steps): level 0 then matches block units.
    "pfcr-lract-nopos-nodrop-carry1": ("pfcr", LRACT + ["--no-pos"] + NODROP + CARRY1 + ["--recon-set", "anneal=unit"]),
    # PFCR's defaults since this row measured best (no POS, no QDrop, carry=1, anneal=levels).
    "pfcr-lract-nopos-nodrop-anneal": ("pfcr", LRACT + ["--no-pos"] + NODROP + CARRY1
                                       + ["--recon-set", "anneal=levels"]),
    "pfcr-lract-nopos-nodrop-level0": ("pfcr", LRACT + ["--no-pos"] + NODROP
                                       + ["--recon-set", "stop_at=0"]),  # half-block units only
    "pfcr-nopos": ("pfcr", ["--no-pos"] + PAPER_NOPOS),
    "pfcr-carry1": ("pfcr", PAPER + CARRY1),      # keep the previous level's rounding as is
    "pfcr-level0": ("pfcr", PAPER + ["--recon-set", "stop_at=0"]),  # attention and MLP units only
    "pfcr-nodrop": ("pfcr", PAPER + NODROP),    # no QDrop (as brecq)
    "pfcr-nopos-carry1": ("pfcr", ["--no-pos"] + PAPER_NOPOS + CARRY1),
    "pfcr-nopos-nodrop": ("pfcr", ["--no-pos"] + PAPER_NOPOS + NODROP),
    "pfcr-nodrop-carry1": ("pfcr", PAPER + NODROP + CARRY1),
    # The main table's pfcr row with the paper's settings, the pfcr defaults when it ran.
    "pfcr-paper": ("pfcr", PAPER),
    # Today's pfcr defaults with another calibration set and batch order (as brecq-lract-seed1).
    "pfcr-lract-seed1": ("pfcr", LRACT + ["--seed", "1"]),
    "pfcr-lract": ("pfcr", LRACT),  # today's pfcr defaults at the rows' lr_act
    # More calibration images at the same steps (the cpu budget's 256 are revisited ~37 times).
    "brecq-lract-cal1024": ("brecq", LRACT + ["--calib-size", "1024"]),
    "brecq-lract-cal1024-seed1": ("brecq", LRACT + ["--calib-size", "1024", "--seed", "1"]),
    "pfcr-lract-cal1024": ("pfcr", LRACT + ["--calib-size", "1024"]),
    # The last block also fitted to the logits through the final norm and head (KL).
    "brecq-lract-head": ("brecq", LRACT + HEAD),
    "brecq-lract-head-seed1": ("brecq", LRACT + HEAD + ["--seed", "1"]),
    "pfcr-lract-head": ("pfcr", LRACT + HEAD),
    "pfcr-lract-head-seed1": ("pfcr", LRACT + HEAD + ["--seed", "1"]),
    # Shorter coarse levels (PFCR's level_steps): the blocks at 3/4 and the pairs of blocks
    # at 1/2 of the 300 steps, for a run inside 45 minutes on 2 cores.
    "pfcr-lract-edge-short": ("pfcr", LRACT + ["--recon-set", "level_steps=(1.0,0.75,0.5)"]),
    # MGRQ's Fisher-form global term with its weights averaged over the calibration images
    # (one per token and channel) instead of one per image and element (MGRQ's default since)
    "mgrq-edge-fisherpool-lract": ("mgrq", LRACT + POOL),
    "mgrq-edge-fisherpool-lract-seed1": ("mgrq", LRACT + POOL + ["--seed", "1"]),
    # MGRQ's terms (pooled Fisher) on block reconstruction without QDrop: QDrop's 0.5 cost
    # 1.70 points against BRECQ over three seeds at this budget (qdrop 77.55, brecq 79.25);
    # here it gave 76.75 against 77.90 with QDrop (seed 0), so MGRQ keeps qdrop_p 0.5
    "mgrq-edge-fisherpool-nodrop-lract": ("mgrq", LRACT + NODROP + POOL),
    # the same at W3A3 gave 70.25 against 65.45 with QDrop (seed 0): a second seed for both
    # settings (W3A3 65.30 against 65.85, W4A4 79.15 against 78.55)
    "mgrq-edge-fisherpool-nodrop-lract-seed1": ("mgrq", LRACT + NODROP + POOL + ["--seed", "1"]),
    # MGRQ's defaults, W4A4 seed 2 (mgrq-edge-fisherpool-lract also ran at W3A3 and on the
    # digits)
    "mgrq-edge-fisherpool-lract-seed2": ("mgrq", LRACT + POOL + ["--seed", "2"]),
    # the global term alone (no local term): 76.80 against 77.90 with it (seed 0); local
    # alone at 0.1 gave 77.20, QDrop 79.80
    "mgrq-edge-fisherpool-nolocal-lract": ("mgrq", LRACT + POOL + ["--recon-set", "w_local=0.0"]),
    # the local term comparing each layer's output elements with the float layer's
    # (local_loss=mse) instead of their per-channel means and deviations
    "mgrq-edge-fisherpool-localmse-lract": ("mgrq", LRACT + POOL + ["--recon-set", "local_loss=mse"]),
    # the Fisher-weighted error in place of the block's plain output MSE (w_rec=0), as
    # BRECQ's paper weighs the block output by the squared gradients of the task loss
    "mgrq-edge-fisherpool-norec-lract": ("mgrq", LRACT + POOL + ["--recon-set", "w_rec=0.0"]),
    # QDrop's probability falling linearly to 0 over each unit's steps (qdrop_schedule=linear):
    # with QDrop MGRQ's blocks end with QDrop's output errors (last block 0.142 against
    # BRECQ's 0.077), without it the seeds spread 4.95 points at W3A3
    # (W4A4 79.45 / 80.15 / 79.70 against 77.90 / 78.55 / 79.20 with QDrop constant: MGRQ's
    # default since)
    "mgrq-edge-fisherpool-decay-lract": ("mgrq", LRACT + DECAY + POOL),
    "mgrq-edge-fisherpool-decay-lract-seed1": ("mgrq", LRACT + DECAY + POOL + ["--seed", "1"]),
    "mgrq-edge-fisherpool-decay-lract-seed2": ("mgrq", LRACT + DECAY + POOL + ["--seed", "2"]),
    # a third calibration set and batch order for the rows that decide the W4A4 ordering
    "brecq-lract-edge-seed2": ("brecq", LRACT + ["--seed", "2"]),
    "qdrop-lract-edge-seed2": ("qdrop", LRACT + ["--seed", "2"]),
    "pfcr-lract-edge-seed2": ("pfcr", LRACT + ["--seed", "2"]),
    # QDrop with the decay at more seeds (seed 0: qdrop-lract-decay), and PFCR with QDrop at
    # the paper's 0.5 again, now decaying to 0 over each unit's steps (PFCR runs without QDrop
    # since constant 0.5 measured worse). QDrop decaying, W4A4: 80.30 / 79.45 / 78.75 (seeds
    # 0 / 1 / 2, mean 79.50; MGRQ 79.45 / 80.15 / 79.70, 79.77); PFCR with it 79.15 (82.00
    # without QDrop), its last unit at 0.097 (0.083): not kept
    "qdrop-lract-decay-seed1": ("qdrop", LRACT + DECAY + ["--seed", "1"]),
    "qdrop-lract-decay-seed2": ("qdrop", LRACT + DECAY + ["--seed", "2"]),
    "pfcr-lract-drop-decay": ("pfcr", LRACT + ["--recon-set", "qdrop_p=0.5"] + DECAY),
    # The learned rounding starting from GPTQ's (ReconConfig.round_start="gptq": around each
    # block Linear's GPTQ-compensated weight) instead of round-to-nearest: a lower error
    # before training, none after; PFCR 81.10 (82.00 from nearest), BRECQ 79.50 (79.60): not kept
    "pfcr-lract-gptqstart": ("pfcr", LRACT + GPTQ_START),
    "brecq-lract-gptqstart": ("brecq", LRACT + GPTQ_START),
}
# MGRQ's QDrop probability stayed constant in every MGRQ row before the decay rows (its
# default then): those rows name it, so that they keep reproducing their results.
STEADY = ["--recon-set", "qdrop_schedule=constant"]
for _row, (_base, _extra) in list(VARIANTS.items()):
    if _base == "mgrq" and DECAY[-1] not in _extra:
        VARIANTS[_row] = (_base, _extra + STEADY)


def reconstructs(row: str) -> bool:
    """Whether a row runs a reconstruction method (then it has a budget and a state dir)."""
    from fastquant.recon import method_names

    return VARIANTS.get(row, (row, []))[0] in method_names()


def recon_rows() -> tuple[str, ...]:
    """The reconstruction rows: every registered method (fastquant.recon's registry) and the variants."""
    from fastquant.recon import method_names

    return (*method_names(), *VARIANTS)



STATE = ROOT / "bench" / "results" / "state"  # reconstruction states of unfinished runs (not committed)
MODELS = ROOT / "bench" / "results" / "models"  # the quantized models of the runs (not committed)


def command(model, method, w, a, budget, eval_size, js, state=None, out=None, data="fmnist", source=()):
    """The CLI command of one row (``source``: --checkpoint/--img-size arguments of the model)."""
    base, extra = VARIANTS.get(method, (method, []))
    cmd = [sys.executable, "-m", "fastquant.cli", "quantize", "--model", model, *source, "--data", data,
           "--method", base, "--w-bits", str(w), "--a-bits", str(a), "--eval-size", str(eval_size)]
    if reconstructs(method):
        cmd += ["--budget", budget]
    cmd += extra
    if state is not None:
        cmd += ["--state-dir", str(state)] + (["--resume"] if (state / "recon_state.pt").is_file() else [])
    if out is not None:
        cmd += ["--out", str(out)]
    return cmd + ["--json", str(js)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dinov2-s14-fmnist")
    p.add_argument("--data", default="fmnist", help="fmnist or imagefolder:PATH")
    p.add_argument("--checkpoint", help="a timm model's checkpoint (with --model a timm name)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--label", help="the name of the model and data in file names (default: --model)")
    p.add_argument("--settings", default="4/4,3/3")
    p.add_argument("--budget", default="cpu", choices=("cpu", "full"))
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--methods", default="rtn,repq,brecq,qdrop,pfcr,pfcr-nopos,mgrq",
                   help=f"rows: rtn, repq, the reconstruction methods and the PFCR variants {', '.join(VARIANTS)}")
    p.add_argument("--name", default="", help="suffix of the summary file: recon_<model>_<budget>[_NAME].json "
                                              "(keeps the main table apart from ablation runs)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: make the table from the finished runs, listing the missing ones")
    args = p.parse_args(argv)
    label = args.label or args.model
    source = (["--checkpoint", args.checkpoint] if args.checkpoint else []) + (
        ["--img-size", str(args.img_size)] if args.img_size else [])
    runs = ROOT / "bench" / "results" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    MODELS.mkdir(parents=True, exist_ok=True)
    from fastquant.config import CALIB_PRESETS

    unknown = [m for m in args.methods.split(",") if m not in (*CALIB_PRESETS, *recon_rows())]
    if unknown:
        sys.exit(f"unknown rows: {', '.join(unknown)} (see --help)")
    records = []
    for setting in args.settings.split(","):
        w, a = (int(v) for v in setting.split("/"))
        for method in args.methods.split(","):
            tag = f"{args.budget}_" if reconstructs(method) else ""
            js = runs / f"{label}_{method}_{tag}w{w}a{a}.json"
            state = STATE / js.stem if reconstructs(method) else None  # a stopped run continues from here
            model_file = MODELS / f"{js.stem}.safetensors"  # for bench/error_sources.py --quantized
            where = dict(data=args.data, source=source)
            cmd = command(args.model, method, w, a, args.budget, args.eval_size, js, state, model_file, **where)
            shown = " ".join(["fastquant"] + command(args.model, method, w, a, args.budget, args.eval_size, js,
                                                     **where)[3:-2])
            if not js.is_file():
                if args.table_only:
                    print(f"missing (not run yet): {shown}")
                    continue
                print("$", shown, flush=True)
                subprocess.run(cmd, check=True)
            rec = json.loads(js.read_text())
            rec["row"], rec["command"] = method, shown
            records.append(rec)
    if not records:
        sys.exit("no finished runs to tabulate")
    out = ROOT / "bench" / "results" / f"recon_{label}_{args.budget}{'_' + args.name if args.name else ''}.json"
    # the summary keeps the rows of its other settings (a later --settings 3/3 under the same
    # --name adds to the 4/4 rows instead of replacing them)
    key = lambda r: (r.get("row"), r["w_bits"], r["a_bits"])  # noqa: E731
    ours = {key(r) for r in records}
    kept = json.loads(out.read_text()).get("records", []) if out.is_file() else []
    records_all = [r for r in kept if key(r) not in ours] + records
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "budget": args.budget, "records": records_all}
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\nfull precision: {records[0]['fp_top1']:.2f} (first {args.eval_size} test images)\n")
    print("| method | W/A | top-1 | vs full precision | calibration images | budget | steps per unit | quantize time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        steps = r.get("iters_per_unit") or "-"
        print(f"| {r['row']} | {r['w_bits']}/{r['a_bits']} | {r['q_top1']:.2f} | {r['q_top1'] - r['fp_top1']:+.2f} "
              f"| {r['calib_size']} | {r.get('budget') or '-'} | {steps} | {r['quantize_seconds'] / 60:.1f} min"
              + (f" (resumed after unit {r['recon_resumed_from']}: later units only)" if r.get("recon_resumed_from") else "")
              + " |")


if __name__ == "__main__":
    main()
