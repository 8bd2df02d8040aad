"""`robustprune bench --section attacks`: robustprune's attacks against the field's reference on the
same model and images in the same run, on a clean and on an adversarially trained MNIST CNN (where
most points survive APGD-CE, so APGD-T, FAB-T and Square carry the cost).

    PGD-20        robustprune's PGD vs torchattacks.PGD (no random start, step eps/4): images/s
    AutoAttack    robustprune's standard cascade vs the reference (torchattacks' APGD-CE, APGD-T,
                  FAB-T and Square with the original's settings, as a MultiAttack): robust accuracy
                  and seconds of both; ours also per stage"""

from __future__ import annotations

from robustprune.attacks.benchmark import autoattack_benchmark, pgd_benchmark
from robustprune.bench_common import results_table, torchattacks_missing, trained_study_cnn
from robustprune.train import AdversarialTraining, TrainConfig, accuracy

# the adversarially trained CNN: each batch plus its PGD-5 copies at eps 0.3 (Madry's last iterate)
ROBUST_TRAINING = TrainConfig(
    epochs=3,
    adversarial=AdversarialTraining(
        attack="pgd", eps=0.3, ratio=1.0, params={"steps": 5, "step_size": 0.1, "early_stop": False}
    ),
)
ROBUST_TRAIN_IMAGES = 20000
# (model, eps): the clean CNN at the field's MNIST eps (0.3: APGD-CE breaks nearly every point, the
# active set's case) and at 0.1 (half the points survive to the slow stages); the robust CNN at 0.3
CASES = (("clean", 0.3), ("clean", 0.1), ("adversarially trained", 0.3))


def robust_study_cnn(data, device, train_images: int | None = None, seed: int = 0):
    """The study's CNN adversarially trained (PGD-5 at eps 0.3, 3 epochs on 20 000 images)."""
    n = min(train_images or ROBUST_TRAIN_IMAGES, ROBUST_TRAIN_IMAGES)
    return trained_study_cnn(data, device, n, seed, ROBUST_TRAINING)


def attacks_section(console, device, args, data) -> dict:
    missing = torchattacks_missing()
    if missing:
        console.print(f"attacks section skipped: {missing}")
        return {"skipped": missing}
    clean_model, _ = trained_study_cnn(data, device, args.train_images)
    robust_model, fit = robust_study_cnn(data, device, args.train_images)
    out: dict = {}
    t = results_table("robustprune bench: attacks (same model, images and run; robustprune vs torchattacks)")
    models = {"clean": clean_model, "adversarially trained": robust_model}
    for label, eps in CASES:
        model = models[label]
        x, y = data.x_test[: args.eval_images], data.y_test[: args.eval_images]
        n_aa = min(args.autoattack_images, len(x))
        clean = accuracy(model, x, y)
        console.print(
            f"{label} CNN ({clean:.2%} clean): PGD-20 on {len(x):,} images, AutoAttack on {n_aa:,} "
            f"images at eps {eps}, ours and the reference ..."
        )
        pgd = pgd_benchmark(model, x, y, eps=eps, steps=20, batch_size=500)
        aa = autoattack_benchmark(model, x[:n_aa], y[:n_aa], eps=eps, norm="Linf")
        out[f"{label} eps={eps:g}"] = {"clean_accuracy": clean, "eps": eps, "pgd": pgd, "autoattack": aa}
        t.add_row(f"[b]{label} CNN, eps {eps:g}[/b]: clean accuracy", f"{clean:.2%}")
        t.add_row(
            f"  PGD-20 eps {eps}, {len(x):,} images: robustprune / torchattacks",
            f"{pgd['robustprune_images_per_s']:,.0f} / {pgd['torchattacks_images_per_s']:,.0f} images/s",
        )
        t.add_row(
            "    speed-up (target >= 1.5); robust accuracy ours / theirs",
            f"{pgd['ratio']:.2f}x; {pgd['robustprune_accuracy']:.2%} / {pgd['torchattacks_accuracy']:.2%}",
        )
        t.add_row(
            f"  AutoAttack standard eps {eps}, {n_aa:,} images: robustprune / reference",
            f"{aa['robustprune_seconds']:.1f} / {aa['reference_seconds']:.1f} s",
        )
        t.add_row(
            "    speed-up (target >= 3); robust accuracy ours / reference",
            f"{aa['speedup']:.2f}x; {aa['robustprune_accuracy']:.2%} / {aa['reference_accuracy']:.2%}",
        )
        t.add_row(
            "    robustprune per stage", ", ".join(f"{k} {v:.1f} s" for k, v in aa["robustprune_stage_seconds"].items())
        )
    out["robust_training"] = fit
    console.print(t)
    return out
