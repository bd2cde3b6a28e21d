"""The final global model as a MONAI bundle (MONAI Bundle specification, docs.monai.io "MONAI Bundle"):

    bundle/
      configs/metadata.json    what the model takes and returns (network_data_format), versions, the consortium
      configs/inference.json   network_def, the NIfTI preprocessing medfdd applies, inferer, postprocessing, and a
                               runnable evaluator: `python -m monai.bundle run --config_file configs/inference.json
                               --bundle_root bundle --input_dir SCANS --output_dir OUT` writes OUT/predictions.csv
      models/model.pt          the network's state dict (tensors only: `torch.load(..., weights_only=True)`)
      docs/README.md           how to run it

A MONAI network (`train.architecture`, e.g. densenet121) is built by MONAI alone; ConvNet-3 needs medfdd installed
(`medfdd.nets.ConvNet`). The preprocessing is the sites' (`medfdd.data.load.bundle_preprocessing`), so the bundle
predicts on a NIfTI scan what medfdd's own loader and model predict.
"""

from __future__ import annotations

import io
import platform
from pathlib import Path

import monai
import numpy as np
import torch

from medfdd import __version__
from medfdd.config import DataConfig
from medfdd.io import atomic_write_bytes, atomic_write_json
from medfdd.nets import Classifier, MonaiClassifier

INFERENCE = "configs/inference.json"
METADATA = "configs/metadata.json"
WEIGHTS = "models/model.pt"


def network_def(model: Classifier) -> dict:
    if isinstance(model, MonaiClassifier):
        return model.bundle_network_def()
    a = model.arch
    return {"_target_": "medfdd.nets.ConvNet", "in_channels": a["in_channels"], "num_classes": a["num_classes"],
            "spatial_size": a["spatial_size"], "width": a["width"], "depth": a.get("depth", 3)}


def _weights(model: Classifier) -> dict[str, torch.Tensor]:
    net = model.net if isinstance(model, MonaiClassifier) else model
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


def inference_config(model: Classifier, data: DataConfig) -> dict:
    from medfdd.data.load import bundle_preprocessing

    return {
        "imports": ["$import glob", "$import os", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "input_dir": "$@bundle_root + '/sample'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(model),
        "network": "$@network_def.to(@device)",
        "datalist": "$sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))",
        "preprocessing": {"_target_": "Compose", "transforms": bundle_preprocessing(data)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": f"$@bundle_root + '/{WEIGHTS}'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "ClassificationSaver", "output_dir": "@output_dir", "filename": "predictions.csv",
             "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
             "output_transform": "$monai.handlers.from_engine(['pred'])"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(model: Classifier, data: DataConfig, *, run_name: str, accuracy: float | None) -> dict:
    a = model.arch
    spatial = list(a["spatial_size"])
    return {
        "version": "1.0.0", "changelog": {"1.0.0": f"exported by medfdd {__version__} from run {run_name}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "optional_packages_version": {}, "required_packages_version":
            ({} if isinstance(model, MonaiClassifier) else {"medfdd": __version__}),
        "name": f"medfdd global model ({run_name})",
        "task": f"{len(spatial)}D image classification into {len(data.classes)} classes",
        "description": "The global model of a medfdd consortium run: trained on the sites' differentially private "
                       "synthetic sets (and, in hybrid mode, DP-FedAvg rounds). Inputs are preprocessed exactly as "
                       "the sites preprocess their scans (configs/inference.json `preprocessing`).",
        "authors": "the consortium's coordinator", "copyright": "the consortium",
        "intended_use": "research; validate on your own patients before clinical use",
        "medfdd": {"architecture": a, "classes": list(data.classes), "test_accuracy": accuracy,
                   "python": platform.python_version()},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "any",
                                 "num_channels": int(a["in_channels"]), "spatial_shape": spatial, "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(i): "image" for i in range(int(a["in_channels"]))}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(data.classes),
                                 "spatial_shape": [len(data.classes)], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False,
                                 "channel_def": {str(i): c for i, c in enumerate(data.classes)}}}},
    }


def export_bundle(model: Classifier, out: Path, data: DataConfig, *, run_name: str,
                  accuracy: float | None = None) -> Path:
    """Write the bundle of `model` under `out` (files written atomically; an existing bundle is overwritten)."""
    out = Path(out)
    buf = io.BytesIO()
    torch.save(_weights(model), buf)
    atomic_write_bytes(out / WEIGHTS, buf.getvalue())
    meta = metadata(model, data, run_name=run_name, accuracy=accuracy)
    atomic_write_json(out / INFERENCE, inference_config(model, data))
    atomic_write_json(out / METADATA, meta)
    atomic_write_bytes(out / "docs" / "README.md",
                       README.format(run=run_name, task=meta["task"], classes=", ".join(data.classes)).encode())
    return out


README = """# medfdd global model ({run})

{task}: {classes}.

Run it on a folder of NIfTI scans (probabilities per class in OUT/predictions.csv; MONAI's evaluator needs
`pip install pytorch-ignite`, its bundle command line `pip install fire`):

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --input_dir SCANS --output_dir OUT

or, without `fire`: `python -c "from monai.bundle import run; run(config_file='configs/inference.json',
bundle_root='.', input_dir='SCANS', output_dir='OUT')"`.

In Python: `monai.bundle.ConfigParser` reads configs/inference.json; `network_def` builds the network,
`torch.load("models/model.pt", weights_only=True)` its weights, `preprocessing` prepares a scan as the sites did.
"""

