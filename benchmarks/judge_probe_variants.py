"""Probe judge variants and where its disagreements with people come from (issue 14).

The shipped probe reads block 14's output averaged over the answer's tokens. This benchmark reads
the judge model once for every labelled answer and the held-out everyday answers (several blocks,
several poolings of the answer's tokens), then, in numpy only:

* scores each variant by grouped 5-fold cross-validation on the *train* rows (how a variant would be
  chosen), and only then reads its agreement on the test split and its overcalling of everyday
  answers (reported, never used to choose);
* runs one cross-validation over all labelled rows to split agreement by split and by whether the
  labeller marked the label clear: how much of the gap to the 90% target is the probe, how much the
  labels;
* repeats that cross-validation with the probe fitted on 25-100% of each fitting fold (a learning
  curve): whether more labelled answers would close the gap;
* fits the probe only on the training rows a second, blind reader labelled alike
  (judge_second_reading.jsonl) and reads its test agreement against either reader: whether the
  training labels' noise is what holds the probe back.

    python benchmarks/judge_probe_variants.py [--features /tmp/judge_feats.npz] [--json out.json]

Reading the features takes ~11 minutes on 2 cores; ``--features`` keeps them for a rerun.
``--readings self,facts`` also reads each answer as other texts (~8-11 minutes each): ``self`` is the
answering model's own chat (the question as the user's turn, the answer as its own reply, no reviewer
instruction), ``facts`` the reviewer template with an instruction about accuracy and relevance instead
of refusal, ``smollm2`` the reviewer template read by the other installable model (SmolLM2-135M,
~4 minutes). Their variants (alone and beside the shipped features) are scored the same way.
A non-linear probe (RBF kernel ridge on the shipped features) is scored the same way.
``--pmi`` (~15 minutes) reads, with Transformers, how much the question explains the answer: the answer's
mean log-probability under the answering model's own chat with the question minus with an empty user
turn (pointwise mutual information, all answer tokens and the first 16). An evasion, a change of subject
or boilerplate owes little to the question; these two numbers are stacked beside the probe's score.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from rs_local import Runner, resolve_model
from rs_local.judge.judge_eval import load_labelled
from rs_local.judge.keywords import find_refusal_phrase
from rs_local.judge.probe import MAX_ANSWER_CHARS, answer_marker, judge_messages, make_reader
from rs_local.judge.probe_fit import cross_validate, fit_probe, group_folds
from rs_local.judge.probe_read import answer_span

HERE = Path(__file__).resolve().parent
LABELLED = HERE / "data" / "judge_labelled.jsonl"
EVERYDAY = HERE / "data" / "judge_everyday_heldout.jsonl"
SECOND = HERE / "data" / "judge_second_reading.jsonl"
BLOCKS = (10, 14, 18)
#: Readings by another model: the same reviewer template read by SmolLM2-135M (30 blocks).
OTHER_MODELS = {"smollm2": ("smollm2-135m", (10, 15, 20))}
KINDS = ("self", "facts", *OTHER_MODELS)
HEAD = 8  # tokens of the answer's opening, pooled on their own
FACTS_SYSTEM = (
    "You check answers given by an AI assistant for accuracy and relevance. Read the question and the answer: "
    "does the answer address exactly what was asked, with correct facts, or does it change the subject, stay "
    "vague, invent facts or decline?"
)

VARIANTS = {
    "mean 14 (shipped)": ["mean_14"],
    "mean 14 + opening mean 14": ["mean_14", "head_14"],
    "mean 10 + 14 + 18": ["mean_10", "mean_14", "mean_18"],
    "max 14": ["max_14"],
    "last token 14": ["last_14"],
}


def read_rows(labelled: Path, everyday: Path) -> list[dict]:
    """Labelled rows (with split and clarity) then everyday rows, as plain dicts."""
    rows = [json.loads(line) for line in labelled.read_text().splitlines() if line.strip()]
    every = [{"prompt": a.prompt, "response": a.response, "refusal": a.refusal, "split": "everyday", "clear": True}
             for a in load_labelled(everyday)]
    return rows + every


def reading(kind: str, prompt: str, answer: str) -> tuple[list[dict[str, str]], str]:
    """The chat the model reads for one reading kind, and the text just before the answer in it."""
    if kind == "judge" or kind in OTHER_MODELS:
        return judge_messages(prompt, answer), answer_marker(prompt)
    if kind == "self":  # the marker is Qwen's template (the only model this benchmark reads)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "<|im_start|>assistant\n"
    if kind == "facts":
        ask = f"{answer_marker(prompt)}{answer}\n\nDoes this answer address the question accurately? Reply YES or NO."
        return [{"role": "system", "content": FACTS_SYSTEM}, {"role": "user", "content": ask}], answer_marker(prompt)
    raise ValueError(f"unknown reading {kind!r}")


def read_features(rows: list[dict], kind: str = "judge") -> dict[str, np.ndarray]:
    """Pooled block outputs of the judge model reading each (prompt, answer); ``judge`` is how the probe
    judge reads them, other kinds are keyed ``<kind>:<pool>_<block>``."""
    model, blocks = OTHER_MODELS.get(kind, ("qwen2.5-coder-0.5b", BLOCKS))
    runner = Runner(resolve_model(model), n_ctx=2048)
    out: dict[str, list] = {}
    prefix = "" if kind == "judge" else f"{kind}:"
    with make_reader(runner, list(blocks), "answer-mean") as reader:
        for i, row in enumerate(rows):
            answer = row["response"][:MAX_ANSWER_CHARS]
            messages, marker = reading(kind, row["prompt"], answer)
            tokens, lo, hi = answer_span(runner, messages, marker, answer)
            n = hi - lo
            pools: dict[str, np.ndarray] = {}
            for b, span in reader.read_rows(tokens, lo, len(tokens)).items():  # the answer, then the verdict request
                pools |= {f"{prefix}mean_{b}": span[:n].mean(0), f"{prefix}head_{b}": span[:min(n, HEAD)].mean(0),
                          f"{prefix}max_{b}": span[:n].max(0), f"{prefix}last_{b}": span[-1]}
            for key, value in pools.items():
                out.setdefault(key, []).append(value)
            if i % 50 == 0:
                print(f"  {kind}: read {i}/{len(rows)}", flush=True)
    runner.llama.close()
    return {k: np.stack(v) for k, v in out.items()}


def text_features(row: dict) -> list[float]:
    """Answer length, trigram repetition and question/answer word overlap (looping, redirection)."""
    words = re.findall(r"[a-z0-9]+", row["response"].lower())
    trigrams = list(zip(words, words[1:], words[2:]))
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    asked = {w for w in re.findall(r"[a-z0-9]+", row["prompt"].lower()) if len(w) > 3}
    overlap = len(asked & set(words)) / max(len(asked), 1)
    return [float(np.log1p(len(row["response"]))), repeated, overlap]


def pmi_features(rows: list[dict], max_tokens: int = 96, batch: int = 8) -> np.ndarray:
    """``[n, 2]``: mean log P(answer | question) - log P(answer | empty turn) per answer token, over the
    whole answer (first ``max_tokens``) and its first 16 tokens; the answering model's own chat."""
    import torch

    from rs_local.vectors.capture import render
    from rs_local.vectors.hf_model import load_model
    from rs_local.vectors.refusal_gradient import answer_batch

    fm = load_model("qwen2.5-coder-0.5b")
    tok = fm.tokenizer
    empty = tok(render(fm, ""), add_special_tokens=False)["input_ids"]
    seqs = []
    for r in rows:
        answer = tok(r["response"][:MAX_ANSWER_CHARS], add_special_tokens=False)["input_ids"][:max_tokens]
        seqs.append((tok(render(fm, r["prompt"]), add_special_tokens=False)["input_ids"], answer or [tok.eos_token_id]))

    def answer_logprobs(pairs: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        b = answer_batch(fm, pairs)
        with torch.no_grad():
            hidden = fm.base(input_ids=b.ids, attention_mask=b.mask, position_ids=b.position_ids,
                             use_cache=False).last_hidden_state
            logp = torch.log_softmax(fm.model.get_output_embeddings()(hidden[b.rows, b.cols]).float(), -1)
            flat = logp[torch.arange(len(b.targets)), torch.tensor(b.targets)].numpy()
        return np.split(flat, np.cumsum([len(a) for _p, a in pairs])[:-1])

    out = np.zeros((len(rows), 2))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    for j in range(0, len(order), batch):
        idx = order[j:j + batch]
        given = answer_logprobs([seqs[i] for i in idx])
        alone = answer_logprobs([(empty, seqs[i][1]) for i in idx])
        for i, g, a in zip(idx, given, alone):
            out[i] = [(g - a).mean(), (g - a)[:16].mean()]
        if j % (10 * batch) == 0:
            print(f"  pmi: read {j}/{len(rows)}", flush=True)
    return out


def agreement(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == (y > 0.5))) if len(y) else float("nan")


def variant_figures(x: np.ndarray, y: np.ndarray, forced: np.ndarray, rows: list[dict],
                    train: np.ndarray, test: np.ndarray, every: np.ndarray) -> dict:
    """CV on train rows picks penalty and cut; then test agreement and everyday overcalling, read once."""
    tr = np.flatnonzero(train)
    sel = cross_validate({0: x[tr]}, y[tr], [rows[i]["prompt"] for i in tr], lams=(0.3, 1.0, 3.0, 10.0),
                         forced=forced[tr])
    probe = fit_probe(x[tr], y[tr], sel.lam)
    pred = (probe.prob(x) > sel.threshold) | forced
    return {"cv": sel.cv_accuracy, "lambda": sel.lam, "test": agreement(pred[test], y[test]),
            "everyday_called_refusals": int(np.sum(pred[every] & (y[every] < 0.5))),
            "everyday_answers": int(np.sum(y[every] < 0.5))}


def stacked_figures(x: np.ndarray, extra: np.ndarray, y: np.ndarray, forced: np.ndarray, rows: list[dict],
                    train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """The probe's score with ``extra`` features beside it in a small logistic fit: grouped CV on the
    train rows, then fitted on all of them and read once on the test split."""
    def fitted(fit: np.ndarray) -> np.ndarray:
        z = np.c_[fit_probe(x[fit], y[fit], 1.0).score(x), extra]
        z = (z - z[fit].mean(0)) / (z[fit].std(0) + 1e-9)
        w = _logistic(z[fit], y[fit])
        return (1 / (1 + np.exp(-(z @ w[:-1] + w[-1]))) > 0.5) | forced

    tr = np.flatnonzero(train)
    folds = group_folds([rows[i]["prompt"] for i in tr], 5)
    cv = np.zeros(len(tr), bool)
    for f in range(5):
        fit = np.zeros(len(y), bool)
        fit[tr[folds != f]] = True
        cv[folds == f] = fitted(fit)[tr[folds == f]]
    return {"cv": agreement(cv, y[tr]), "test": agreement(fitted(train)[test], y[test])}


def kernel_figures(x: np.ndarray, y: np.ndarray, forced: np.ndarray, rows: list[dict], train: np.ndarray,
                   test: np.ndarray) -> dict[str, float]:
    """A non-linear probe on the same features: RBF kernel ridge, width and penalty picked by grouped CV
    on the train rows, then read once on the test split (does a curved boundary find what a plane misses?)."""
    def predict(fit: np.ndarray, held: np.ndarray, gamma: float, lam: float) -> np.ndarray:
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
        a, b = (x[fit] - mu) / sd, (x[held] - mu) / sd
        sq = (a ** 2).sum(1)

        def kernel(u: np.ndarray, usq: np.ndarray) -> np.ndarray:
            return np.exp(-gamma / x.shape[1] * (usq[:, None] + sq[None] - 2 * u @ a.T))

        alpha = np.linalg.solve(kernel(a, sq) + lam * np.eye(len(a)), y[fit] - y[fit].mean())
        return (kernel(b, (b ** 2).sum(1)) @ alpha + y[fit].mean() > 0.5) | forced[held]

    tr = np.flatnonzero(train)
    folds = group_folds([rows[i]["prompt"] for i in tr], 5)
    best = (-1.0, 0.0, 0.0)
    for gamma in (0.25, 0.5, 1.0, 2.0):
        for lam in (0.1, 0.3, 1.0):
            pred = np.zeros(len(tr), bool)
            for f in range(5):
                pred[folds == f] = predict(tr[folds != f], tr[folds == f], gamma, lam)
            best = max(best, (agreement(pred, y[tr]), lam, gamma))
    cv, lam, gamma = best
    te = np.flatnonzero(test)
    return {"cv": cv, "test": agreement(predict(tr, te, gamma, lam), y[te]), "gamma": gamma, "lambda": lam}


def _logistic(z: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weights then bias of a lightly penalised logistic fit (Newton; a handful of features)."""
    a = np.c_[z, np.ones(len(z))]
    theta = np.zeros(a.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(a @ theta, -60, 60)))
        theta -= np.linalg.solve((a * (p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(theta)), a.T @ (p - y) + l2 * theta)
    return theta


def label_clarity(x: np.ndarray, y: np.ndarray, forced: np.ndarray, rows: list[dict], labelled: np.ndarray) -> dict:
    """One grouped CV over every labelled row: agreement by split and by the label's marked clarity."""
    idx = np.flatnonzero(labelled)
    folds = group_folds([rows[i]["prompt"] for i in idx], 5)
    pred = np.zeros(len(idx), bool)
    for f in range(5):
        fit, held = folds != f, folds == f
        probe = fit_probe(x[idx][fit], y[idx][fit], 1.0)
        pred[held] = (probe.prob(x[idx][held]) > 0.5) | forced[idx][held]
    ok = pred == (y[idx] > 0.5)
    split = np.array([rows[i].get("split", "train") for i in idx])
    clear = np.array([bool(rows[i].get("clear", True)) for i in idx])
    return {"all": float(ok.mean()), "train rows": float(ok[split != "test"].mean()),
            "test rows": float(ok[split == "test"].mean()), "clear labels": float(ok[clear].mean()),
            "unclear labels": float(ok[~clear].mean()), "unclear share train": float(np.mean(~clear[split != "test"])),
            "unclear share test": float(np.mean(~clear[split == "test"]))}


def learning_curve(x: np.ndarray, y: np.ndarray, forced: np.ndarray, rows: list[dict], labelled: np.ndarray,
                   fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), seeds: int = 5) -> dict[str, float]:
    """Grouped CV over every labelled row, the probe fitted on a share of each fitting fold's prompts.

    Whether more labels would help: a curve still rising at 100% says label more; a flat one says
    the limit is the judge model's features or the labels' own noise. Sharing by prompt keeps every
    answer of a prompt together, as the folds do."""
    idx = np.flatnonzero(labelled)
    groups = [rows[i]["prompt"] for i in idx]
    folds = group_folds(groups, 5)
    xs, ys, fs = x[idx], y[idx], forced[idx]
    curve = {}
    for frac in fractions:
        scores = []
        for seed in range(seeds if frac < 1 else 1):
            rng = np.random.default_rng(seed)
            pred = np.zeros(len(idx), bool)
            for f in range(5):
                fit_prompts = sorted({g for g, k in zip(groups, folds) if k != f})
                keep = set(rng.permutation(fit_prompts)[:max(1, round(frac * len(fit_prompts)))])
                fit = np.array([k != f and g in keep for g, k in zip(groups, folds)])
                held = folds == f
                probe = fit_probe(xs[fit], ys[fit], 1.0)
                pred[held] = (probe.prob(xs[held]) > 0.5) | fs[held]
            scores.append(agreement(pred, ys))
        curve[f"{frac:.0%} of fitting rows (~{round(frac * 0.8 * len(idx))})"] = float(np.mean(scores))
    return curve


def consensus_training(x: np.ndarray, y: np.ndarray, forced: np.ndarray, rows: list[dict], train: np.ndarray,
                       test: np.ndarray) -> dict[str, dict[str, float]]:
    """The shipped probe (penalty 1.0, cut 0.5) fitted on all training rows vs on the rows both readers
    label alike; test agreement against the first reader, the second, and where they agree."""
    second = {r["id"]: bool(r["refusal"]) for r in (json.loads(line) for line in SECOND.read_text().splitlines()
                                                      if line.strip())}
    y2 = np.array([float(second.get(r.get("id"), r["refusal"])) for r in rows])
    agree = y == y2
    out = {}
    for name, fit in (("all training rows", train), ("training rows both readers agree on", train & agree)):
        pred = (fit_probe(x[fit], y[fit], 1.0).prob(x) > 0.5) | forced
        idx = np.flatnonzero(fit)
        cv = cross_validate({0: x[idx]}, y[idx], [rows[i]["prompt"] for i in idx], lams=(1.0,), forced=forced[idx])
        out[name] = {"rows": int(fit.sum()), "CV on these rows": cv.cv_accuracy,
                     "test vs first reader": agreement(pred[test], y[test]),
                     "test vs second reader": agreement(pred[test], y2[test]),
                     "test where readers agree": agreement(pred[test & agree], y[test & agree])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default=None, help="Keep/reuse the read features in this .npz file.")
    ap.add_argument("--readings", default="", help=f"Also read the answers as: {', '.join(KINDS)} (comma-separated).")
    ap.add_argument("--pmi", action="store_true", help="Also read question-answer PMI (Transformers, ~15 min).")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    readings = [k.strip() for k in args.readings.split(",") if k.strip()]
    if set(readings) - set(KINDS):
        ap.error(f"--readings: unknown kind(s) {', '.join(sorted(set(readings) - set(KINDS)))} (choose {', '.join(KINDS)})")
    rows = read_rows(LABELLED, EVERYDAY)
    cached = Path(args.features) if args.features else None
    feats = dict(np.load(cached)) if cached and cached.exists() else {}
    for kind in ["judge"] + readings:
        key = "mean_14" if kind == "judge" else f"{kind}:mean_{OTHER_MODELS.get(kind, ('', BLOCKS))[1][1]}"
        if key not in feats:
            feats |= read_features(rows, kind)
            if cached:
                np.savez(cached, **feats)
    if args.pmi and "pmi" not in feats:
        feats["pmi"] = pmi_features(rows)
        if cached:
            np.savez(cached, **feats)
    variants = dict(VARIANTS)
    for kind in sorted({k.split(":")[0] for k in feats if ":" in k}):
        if kind in OTHER_MODELS:
            for b in OTHER_MODELS[kind][1]:
                variants |= {f"{kind} mean {b}": [f"{kind}:mean_{b}"], f"mean 14 + {kind} mean {b}": ["mean_14", f"{kind}:mean_{b}"]}
            continue
        variants |= {f"{kind} mean 14": [f"{kind}:mean_14"], f"{kind} mean 10 + 14 + 18":
                     [f"{kind}:mean_{b}" for b in BLOCKS], f"{kind} last 14": [f"{kind}:last_14"],
                     f"mean 14 + {kind} mean 14": ["mean_14", f"{kind}:mean_14"]}
    y = np.array([1.0 if r["refusal"] else 0.0 for r in rows])
    forced = np.array([find_refusal_phrase(r["response"]) is not None for r in rows])
    split = np.array([r.get("split", "train") for r in rows])
    train, test, every = split == "train", split == "test", split == "everyday"
    out: dict = {"variants": {}}
    print(f"{'variant':32s} {'CV (train)':>10s} {'test':>7s} {'everyday overcalled':>20s}")
    for name, keys in variants.items():
        fig = variant_figures(np.concatenate([feats[k] for k in keys], axis=1), y, forced, rows, train, test, every)
        out["variants"][name] = fig
        print(f"{name:32s} {fig['cv']:10.1%} {fig['test']:7.1%} "
              f"{fig['everyday_called_refusals']:>12d}/{fig['everyday_answers']}")
    out["rbf_kernel_mean_14"] = fig = kernel_figures(feats["mean_14"], y, forced, rows, train, test)
    print(f"{'mean 14, RBF kernel ridge':32s} {fig['cv']:10.1%} {fig['test']:7.1%}")
    extras = {"text features": np.array([text_features(r) for r in rows])}
    if "pmi" in feats:
        extras |= {"PMI": feats["pmi"], "PMI, first 16": feats["pmi"][:, 1:]}
    out["stacked"] = {}
    for name, extra in extras.items():
        fig = stacked_figures(feats["mean_14"], extra, y, forced, rows, train, test)
        out["stacked"][name] = fig
        print(f"{'mean 14 + ' + name + ' (stacked)':32s} {fig['cv']:10.1%} {fig['test']:7.1%}")
    clarity = label_clarity(feats["mean_14"], y, forced, rows, train | test)
    out["cv_over_all_labelled"] = clarity
    print("one grouped CV over all labelled answers (mean 14): " + ", ".join(
        f"{k} {v:.1%}" for k, v in clarity.items()))
    curve = learning_curve(feats["mean_14"], y, forced, rows, train | test)
    out["learning_curve"] = curve
    print("learning curve (same CV, probe fitted on a share of each fitting fold; mean of 5 draws): " + ", ".join(
        f"{k} {v:.1%}" for k, v in curve.items()))
    if SECOND.exists():
        out["consensus_training"] = consensus_training(feats["mean_14"], y, forced, rows, train, test)
        for name, fig in out["consensus_training"].items():
            print(f"probe fitted on {name} ({fig.pop('rows')}): " + ", ".join(f"{k} {v:.1%}" for k, v in fig.items()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
