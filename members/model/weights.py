"""Pre-fetch pretrained weights for offline machines (`make weights EXPERIMENT=...`).

On a machine with internet access this downloads, into `weights/`:
- every backbone an experiment's members name with `hub` weights, saved as the full timm model's
  state dict `weights/<timm tag>.safetensors`;
- the authors' released ViT-B/8 heads `AHIQ_vit_p8_epoch33-da3ea303.pth` (public mirror in the
  Hugging Face repository chaofengc/IQA-PyTorch-Weights);
and writes `weights/SHA256SUMS`. Copy the folder to the offline cluster and point the configs at the
files (`vit_weights: weights/<tag>.safetensors`, `init_from: weights/AHIQ_vit_p8_epoch33-da3ea303.pth`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from members.contract.atomic import atomic_path, atomic_write_text
from members.contract.cli import run_main
from members.contract.stagefiles import sha256_file

AUTHORS_REPO = "chaofengc/IQA-PyTorch-Weights"
AUTHORS_FILE = "AHIQ_vit_p8_epoch33-da3ea303.pth"


class DownloadError(RuntimeError):
    pass


def hub_backbones(member_configs: list) -> list[str]:
    """Unique timm tags that the members load from the hub, in first-use order."""
    tags: list[str] = []
    for cfg in member_configs:
        for name, weights in ((cfg.model.vit, cfg.model.vit_weights), (cfg.model.cnn, cfg.model.cnn_weights)):
            if weights == "hub" and name not in tags:
                tags.append(name)
    return tags


def _offline_hint(what: str, err: Exception) -> DownloadError:
    return DownloadError(
        f"cannot download {what} ({err.__class__.__name__}: {str(err).splitlines()[0][:200]}). "
        "`make weights` needs internet access: run it on a machine that has it and copy the weights/ "
        "folder here, or set the configs' vit_weights / cnn_weights to local timm state-dict files.")


def fetch_backbone(tag: str, out: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    path = out / f"{tag}.safetensors"
    if path.is_file():
        return path
    try:
        model = timm.create_model(tag, pretrained=True)
    except Exception as err:  # the hub client raises many types; all mean "not downloadable here"
        raise _offline_hint(f"the pretrained weights of '{tag}'", err) from err
    with atomic_path(path) as tmp:
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return path


def fetch_authors_checkpoint(out: Path) -> Path:
    from huggingface_hub import hf_hub_download

    path = out / AUTHORS_FILE
    if path.is_file():
        return path
    try:
        return Path(hf_hub_download(AUTHORS_REPO, AUTHORS_FILE, local_dir=str(out)))
    except Exception as err:
        raise _offline_hint(f"{AUTHORS_FILE} from {AUTHORS_REPO}", err) from err


def main(argv: list[str] | None = None) -> int:
    from members.contract.schema import load_experiment

    parser = argparse.ArgumentParser(
        prog="members.model.weights", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML whose members' weights to fetch")
    parser.add_argument("--out", default="weights", help="folder for the files (default: weights)")
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' ViT-B/8 checkpoint")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exp = load_experiment(args.config)
    try:
        files = [fetch_backbone(tag, out) for tag in hub_backbones([m.config for m in exp.members])]
        if not args.no_authors:
            files.append(fetch_authors_checkpoint(out))
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sums = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    atomic_write_text(out / "SHA256SUMS", sums)
    print(sums + f"wrote {out / 'SHA256SUMS'}; point the configs at these files to run offline")
    return 0


if __name__ == "__main__":
    run_main(main)
