"""``ganprint synth``: a synthetic membership benchmark (real GAN, known members) in the ImageCLEF layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import DEVICE_HELP, handle_errors, print_json
from ganprint.synth.regimes import GENERATOR_DEFAULTS, REGIMES, regime_help

REGIME_NAMES = tuple(REGIMES)
GENERATOR_NAMES = tuple(GENERATOR_DEFAULTS)


def _complete_regime(incomplete: str) -> list[str]:
    return [r for r in REGIME_NAMES if r.startswith(incomplete)]


def _complete_generator(incomplete: str) -> list[str]:
    return [g for g in GENERATOR_NAMES if g.startswith(incomplete)]


def _ddpm(key: str) -> str:
    return f"; ddpm {GENERATOR_DEFAULTS['ddpm'][key]:g}"


@handle_errors
def synth(
    out: Path = typer.Argument(..., help="Output folder: OUT/dev, OUT/test, OUT/test_truth.csv, OUT/synth.json, OUT/generator.safetensors (and OUT/replicas.csv with --copies, OUT/reference with --reference-real)."),
    regime: str = typer.Option("memorize", "--regime", "-r", autocompletion=_complete_regime,
                               help="memorize (few members, many steps: strong signal), balanced, generalize (many members: weak signal), or copies (balanced + 15% replicas)."),
    generator: str = typer.Option("dcgan", "--generator", "-g", autocompletion=_complete_generator,
                                  help="dcgan (a small spectral-norm DCGAN) or ddpm (a small diffusers UNet, DDIM sampling)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantoms, the split, the generator and its samples."),
    size: Optional[int] = typer.Option(None, "--size", help="Output image size in pixels (square). [default: 256]"),
    dev_real: Optional[int] = typer.Option(None, "--dev-real", help=f"Dev real_used and real_not_used images, each. [default: {regime_help('dev_real')}]"),
    test_real: Optional[int] = typer.Option(None, "--test-real", help=f"Test members and non-members in real_unknown, each. [default: {regime_help('test_real')}]"),
    reference_real: Optional[int] = typer.Option(None, "--reference-real", help="Extra known non-members (own patients, never trained on) in OUT/reference/real_not_used: a p-value null outside dev, as a data owner's own non-member images. [default: 0]"),
    dev_generated: Optional[int] = typer.Option(None, "--dev-generated", help="Generated images in dev. [default: 500]"),
    test_generated: Optional[int] = typer.Option(None, "--test-generated", help="Generated images in test. [default: 1000]"),
    slices_per_patient: Optional[int] = typer.Option(None, "--slices-per-patient", help="Neighbouring slices per phantom patient (near-duplicates). [default: 2]"),
    real_dir: Optional[Path] = typer.Option(None, "--real-dir", help="Use your own real images (a folder) instead of phantoms."),
    group_by_folder: bool = typer.Option(False, "--group-by-folder", help="With --real-dir: images in one sub-folder are one patient (never split)."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Generator training steps. [default: {regime_help('steps')}{_ddpm('steps')}]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size. [default: 16]"),
    gan_res: Optional[int] = typer.Option(None, "--gan-res", help=f"Generator working resolution, a power of two; samples are upsampled to --size. [default: 64{_ddpm('gan_res')}]"),
    gan_width: Optional[int] = typer.Option(None, "--gan-width", help=f"Channel width (DCGAN: generator's last, discriminator's first layer; DDPM: UNet's first level). [default: 16{_ddpm('gan_width')}]"),
    z_dim: Optional[int] = typer.Option(None, "--z-dim", help="DCGAN latent size. [default: 64]"),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Adam learning rate (DCGAN: of both networks). [default: 2e-4{_ddpm('lr')}]"),
    ddpm_sample_steps: Optional[int] = typer.Option(None, "--ddpm-sample-steps", help="DDPM: DDIM sampling steps per image. [default: 10]"),
    ddpm_train_t: Optional[str] = typer.Option(None, "--ddpm-train-t", help="DDPM: training timesteps: all (uniform over the 1000) or sampler (only the ones DDIM sampling visits). [default: all]"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Loss curve in synth.json: one point per this many steps. [default: 25]"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch; more rarely help this small GAN and stall on a busy machine. [default: 1]"),
    copies: Optional[float] = typer.Option(None, "--copies", help=f"Fraction of each split's generated images replaced by transformed replicas of random members (truth in OUT/replicas.csv). [default: 0; {regime_help('copies')}]"),
    copy_rotation: Optional[float] = typer.Option(None, "--copy-rotation", help="Replicas: largest rotation, degrees (+-). [default: 10]"),
    copy_shift: Optional[float] = typer.Option(None, "--copy-shift", help="Replicas: largest translation per axis, fraction of the side (+-). [default: 0.08]"),
    copy_gamma_min: Optional[float] = typer.Option(None, "--copy-gamma-min", help="Replicas: smallest gamma (log-uniform). [default: 0.8]"),
    copy_gamma_max: Optional[float] = typer.Option(None, "--copy-gamma-max", help="Replicas: largest gamma. [default: 1.25]"),
    copy_blur: Optional[float] = typer.Option(None, "--copy-blur", help="Replicas: largest down-sampling factor of the blur (1 = none). [default: 2]"),
    copy_noise: Optional[float] = typer.Option(None, "--copy-noise", help="Replicas: largest Gaussian noise sigma, gray levels. [default: 6]"),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the output path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build a benchmark with known membership: real images, a GAN trained on some of them, its samples.

    Prints OUT (for pipes); OUT/test_truth.csv holds the answers, OUT/synth.json the provenance.
    """
    from ganprint.progress import log
    from ganprint.synth import resolve_config, run_synth

    cfg = resolve_config(
        regime, generator, seed=seed, size=size, dev_real=dev_real, test_real=test_real, reference_real=reference_real,
        dev_generated=dev_generated,
        test_generated=test_generated, slices_per_patient=slices_per_patient,
        real_dir=str(real_dir) if real_dir is not None else None, group_by_folder=group_by_folder or None,
        steps=steps, batch_size=batch_size, gan_res=gan_res, gan_width=gan_width, z_dim=z_dim, lr=lr,
        log_every=log_every, device=device, threads=threads, copies=copies, copy_rotation=copy_rotation,
        copy_shift=copy_shift, copy_gamma_min=copy_gamma_min, copy_gamma_max=copy_gamma_max, copy_blur=copy_blur,
        copy_noise=copy_noise, ddpm_sample_steps=ddpm_sample_steps,
        ddpm_train_t=ddpm_train_t,
    )
    res = run_synth(out, cfg, force=force, progress=not quiet)
    if not quiet:
        c = res.counts
        log(f"synth ({cfg.regime}, {cfg.generator}): {c['train_images']} members trained {cfg.steps} steps on {res.device}; "
            f"dev {c['dev']['generated']} generated / {c['dev'].get('real_used', 0)} used / "
            f"{c['dev'].get('real_not_used', 0)} not used, test {c['test']['generated']} generated / "
            f"{c['test'].get('real_unknown', 0)} unknown in {res.seconds['total']:.1f}s")
        if cfg.copies > 0:
            rc = c["replicas"]
            log(f"replicas: dev {rc['dev']}, test {rc['test']} (truth in {res.out}/replicas.csv); "
                f"{rc['test_members_with_replica']} of {c['test']['members']} test members have one")
    if as_json:
        print_json({"out": str(res.out), "regime": cfg.regime, "generator": cfg.generator, "seed": cfg.seed, "counts": res.counts,
                    "seconds": res.seconds, "generator_sha256": res.generator_sha256, "device": res.device,
                    "final_losses": res.final_losses})
    else:
        typer.echo(str(res.out))


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
