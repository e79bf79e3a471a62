"""Arguments of `m2m train`: the original toolkit's option names and meanings, plus store inputs.

Run ``m2m train`` directly for one process, or under ``torchrun --nproc-per-node N``
(or ``srun``) for N processes with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import os

from map2map.cli.types import ints as _int_tuple
from map2map.cli.types import json_object as _json_object
from map2map.cli.types import names as _str_list
from map2map.cli.types import pad as _pad

CKPT_LINK = "checkpoint.pt"  # map2map.utils.checkpoint.CKPT_LINK, spelled out so that parsing needs no torch
DIST_TIMEOUT_S = 1800.0  # map2map.train.DIST_TIMEOUT_S (torch's default process group timeout), likewise


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags, unset options, and help texts that already explain theirs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (action.default in (None, False) or "default" in (action.help or "")
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return action.help or ""
        return super()._get_help_string(action)


def add_train(sub: argparse._SubParsersAction) -> None:
    """Register `m2m train`."""
    p = sub.add_parser(
        "train", help="train a model on crops of input and target fields (one process, or DDP under torchrun/srun)",
        formatter_class=_Formatter,
        description="Train a field-to-field emulator. Writes state_{epoch}.pt after every epoch (with a "
                    f"model card for m2m infer), the {CKPT_LINK} link to the latest, and TensorBoard logs under "
                    "runs/, all in the run directory (--run-dir), and resumes from its checkpoint.pt when it "
                    "exists. Run under "
                    "`torchrun --nproc-per-node N` or `srun` for N processes (gloo on CPU, nccl on GPU).")

    data = p.add_argument_group("data")
    data.add_argument("--train-data", metavar="STORE",
                      help="store (from m2m convert) with the training fields: a local path or a URL "
                           "(s3://, gs://, file://, ...; see --storage-options)")
    data.add_argument("--val-data", metavar="STORE",
                      help="store with the validation fields (same names): a local path or a URL")
    data.add_argument("--storage-options", metavar="JSON",
                      help="keyword arguments of the fsspec filesystem that reads URL stores (--train-data, "
                           "--val-data such as s3://bucket/train.zarr), e.g. '{\"endpoint_url\": "
                           "\"https://s3.example.org\"}'; credentials come from the environment as usual. Every "
                           "loader worker and process gets them. The run directory (checkpoints, TensorBoard "
                           "logs) stays local")
    data.add_argument("--in", dest="in_fields", type=_str_list, metavar="NAME[,NAME]",
                      help="input field names in the stores, concatenated along channels")
    data.add_argument("--tgt", dest="tgt_fields", type=_str_list, metavar="NAME[,NAME]",
                      help="target field names in the stores, concatenated along channels")
    data.add_argument("--train-in-patterns", type=_str_list, metavar="GLOB[,GLOB]",
                      help="instead of a store: comma-separated glob patterns of the training input .npy "
                           "files, one pattern per field")
    data.add_argument("--train-tgt-patterns", type=_str_list, metavar="GLOB[,GLOB]",
                      help="glob patterns of the training target .npy files")
    data.add_argument("--val-in-patterns", type=_str_list, metavar="GLOB[,GLOB]",
                      help="glob patterns of the validation input .npy files")
    data.add_argument("--val-tgt-patterns", type=_str_list, metavar="GLOB[,GLOB]",
                      help="glob patterns of the validation target .npy files")
    data.add_argument("--in-norms", type=_str_list, metavar="NORM[,NORM]",
                      help="normalization of each input field, e.g. cosmology.dis (from map2map.data.norms "
                           "or module.name in --callback-at)")
    data.add_argument("--tgt-norms", type=_str_list, metavar="NORM[,NORM]",
                      help="normalization of each target field")
    data.add_argument("--crop", type=_int_tuple, metavar="N[,N,N]",
                      help="crop size on the input grid (default: the whole field)")
    data.add_argument("--crop-start", type=_int_tuple, metavar="N[,N,N]", help="anchor of the first crop (default: 0)")
    data.add_argument("--crop-stop", type=_int_tuple, metavar="N[,N,N]",
                      help="anchors stay below this (default: the field size)")
    data.add_argument("--crop-step", type=_int_tuple, metavar="N[,N,N]",
                      help="spacing of crop anchors (default: the crop size)")
    data.add_argument("--in-pad", "--pad", type=_pad, default=0, metavar="auto|N[,...]",
                      help="periodic pad of the input beyond the crop: 1, d or 2d integers (all axes, per axis, "
                           "per side), or 'auto' for the smallest pad whose output covers the target crop")
    data.add_argument("--tgt-pad", type=_int_tuple, default=0, metavar="N[,...]",
                      help="periodic pad of the target beyond the crop, same format as --in-pad")
    data.add_argument("--scale-factor", type=int, default=1,
                      help="upsampling factor of super-resolution: the target grid is this much finer; crop "
                           "and pads are on the input grid")
    data.add_argument("--augment", action="store_true",
                      help="augment by random flips and axis permutations (vector fields turn with the axes)")
    data.add_argument("--aug-shift", type=_int_tuple, metavar="N[,N,N]",
                      help="augment by shifting each crop by [0, N) voxels")
    data.add_argument("--aug-add", type=float, metavar="STD", help="additive noise augmentation: normal std")
    data.add_argument("--aug-mul", type=float, metavar="STD",
                      help="multiplicative augmentation: log-normal std")
    data.add_argument("--batch-size", "--batches", type=int, default=1, help="mini-batch size per process")
    data.add_argument("--loader-workers", type=int, default=2,
                      help="data loading subprocesses per process; 0 loads in the training process")
    data.add_argument("--readahead", type=float, default=None, metavar="MiB",
                      help="read-ahead across items per loading process: MiB of stored chunks of the next items "
                           "the disk is asked to read while the current one is copied (default: two items; 0: off)")
    data.add_argument("--div-data", action="store_true",
                      help="divide the field files among processes (each reads only its own files; redrawn "
                           "every epoch)")
    data.add_argument("--div-shuffle-dist", type=float, default=1,
                      help="with --div-data, mix crops of files at most this many positions apart (0: one file "
                           "at a time)")

    model = p.add_argument_group("model and optimization")
    model.add_argument("--model", required=True,
                       help="model class: a name in map2map.models (e.g. VNet, UNet, G) or module.Name in "
                            "--callback-at")
    model.add_argument("--criterion", default="MSELoss", help="loss: a torch.nn name or module.Name in --callback-at")
    model.add_argument("--optimizer", default="Adam",
                       help="optimizer: a torch.optim name or module.Name in --callback-at")
    model.add_argument("--lr", type=float, required=True, help="initial learning rate")
    model.add_argument("--optimizer-args", type=_json_object, default={}, metavar="JSON",
                       help="optimizer keyword arguments besides the learning rate, e.g. '{\"betas\": [0.9, 0.999]}'")
    model.add_argument("--reduce-lr-on-plateau", action="store_true",
                       help="reduce the learning rate when the epoch loss (validation if given) stops improving")
    model.add_argument("--scheduler-args", type=_json_object, default={}, metavar="JSON",
                       help="arguments of torch's ReduceLROnPlateau, e.g. '{\"factor\": 0.5, \"patience\": 5}'")
    model.add_argument("--init-weight-std", type=float,
                       help="initialize weights from N(0, std) (norm scales from N(1, std)) instead of the "
                            "model's own initialization")
    model.add_argument("--misc-kwargs", type=_json_object, default={}, metavar="JSON",
                       help="extra keyword arguments passed to the model and to the norms, e.g. '{\"width\": 8}'; "
                            "a key that neither the model nor a norm names is refused (unless your model "
                            "takes **kwargs)")
    model.add_argument("--style", metavar="NAME[,NAME]",
                       help="style parameters of the training store the model takes, in this order (e.g. Om,D); "
                            "default: all of the store's for a styled model (one with a style_size argument, "
                            "e.g. StyledVNet), none for another. Each is normalised by the affine map of its "
                            "range over the training store onto [-1, 1], recorded in the model card")
    model.add_argument("--loss", choices=["lag", "eul", "lag_eul"], default="lag",
                       help="lag: the criterion on output and target; eul: the criterion on the CIC densities "
                            "the output and target displacements imply (needs the store's box size and a "
                            "displacement target); lag_eul: log(L_lag^3 L_eul), or L_lag + W L_eul with "
                            "--eul-weight W")
    model.add_argument("--eul-weight", type=float, metavar="W",
                       help="with --loss lag_eul: the weighted sum L_lag + W L_eul instead of log(L_lag^3 L_eul)")
    model.add_argument("--callback-at", type=os.path.abspath, metavar="DIR",
                       help="directory of your own models, criteria, optimizers and norms, named module.Name; "
                            "searched after the default places")

    adv = p.add_argument_group(
        "adversarial training",
        "train the model (the generator) against a discriminator, as the original toolkit's GAN options do; "
        "each batch steps the discriminator on the generator's output (fake) and the target (real)")
    adv.add_argument("--adv-model", metavar="NAME",
                     help="discriminator: a name in map2map.models (PatchGAN, PatchGAN42; 2D or 3D like the data) "
                          "or module.Name in --callback-at; built as Model(target channels [+ input channels "
                          "with --cgan], 1)")
    adv.add_argument("--adv-model-spectral-norm", action="store_true",
                     help="spectral normalization on every convolution and linear layer of the discriminator")
    adv.add_argument("--adv-criterion", default="BCEWithLogitsLoss",
                     help="discriminator loss on its scores and labels: a torch.nn name, WDistLoss (a "
                          "Wasserstein critic) or module.Name in --callback-at")
    adv.add_argument("--adv-lr", type=float, metavar="LR", help="discriminator learning rate (default: --lr)")
    adv.add_argument("--adv-optimizer-args", type=_json_object, metavar="JSON",
                     help="discriminator optimizer arguments (same --optimizer; default: --optimizer-args)")
    adv.add_argument("--adv-start", type=int, default=0, metavar="EPOCH",
                     help="epochs of supervised training before the adversary starts")
    adv.add_argument("--adv-weight", type=float, metavar="W",
                     help="generator loss supervised + W x adversarial; default: the adversarial loss alone once "
                          "the adversary has started (as the original; the supervised loss is still logged)")
    adv.add_argument("--adv-iter-ratio", type=int, default=1, metavar="N",
                     help="discriminator steps per generator step: the generator steps every N-th batch")
    adv.add_argument("--adv-label-smoothing", type=float, default=1.0, metavar="L",
                     help="the real label in the discriminator's loss, in (0, 1] (one-sided label smoothing)")
    adv.add_argument("--adv-r1-reg-interval", type=int, default=0, metavar="N",
                     help="lazy R1 regularization: every N batches add gamma/2 x N x R1 (the squared gradient of "
                          "the discriminator on real samples) to its loss; 0: off")
    adv.add_argument("--adv-r1-reg-gamma", type=float, default=2.0, metavar="GAMMA",
                     help="weight gamma of R1 (the default 2 gives the original's N x R1)")
    adv.add_argument("--adv-wgan-gp-interval", type=int, default=0, metavar="N",
                     help="every N batches add N x the WGAN gradient penalty (weight 10) to the critic's loss; 0: off")
    adv.add_argument("--cgan", action="store_true",
                     help="conditional GAN: the discriminator also sees the input, brought to the target's grid "
                          "(interpolated by --scale-factor), in front of the fields' channels")
    adv.add_argument("--instance-noise", type=float, default=0.0, metavar="STD",
                     help="instance noise: Gaussian noise of this std added to real and fake samples, decaying "
                          "linearly to 0 over --instance-noise-batches")
    adv.add_argument("--instance-noise-batches", type=int, default=10000, metavar="N",
                     help="batches over which the instance noise decays to 0")

    run = p.add_argument_group("run")
    run.add_argument("--epochs", type=int, default=128, help="total number of epochs (a resumed run continues "
                                                             "up to this many; 0 or fewer than done: nothing to do)")
    run.add_argument("--seed", type=int, default=42,
                     help="seed of the model initialization, data order and augmentation")
    run.add_argument("--run-dir", default=".", metavar="DIR",
                     help="local directory for checkpoints and TensorBoard logs (created if missing; not a URL, "
                          "also when the stores are); one training at a time: a second one in the same "
                          "directory is refused")
    run.add_argument("--load-state", default=None, metavar="PATH",
                     help=f"state to resume from (model, optimizer, RNG, epoch); default: {CKPT_LINK} in the run "
                          "directory, starting fresh when it is missing or empty; '' starts fresh")
    run.add_argument("--load-state-non-strict", dest="load_state_strict", action="store_false",
                     help="load only the model entries whose names and shapes match")
    gpu = p.add_argument_group("device and precision")
    gpu.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where to train: auto is a GPU when this process sees one, else the CPU; each process "
                          "takes GPU local_rank %% (GPUs it sees), so torchrun, srun --gpus-per-task=1 and srun "
                          "--gpus-per-node=G all work; cuda refuses to fall back to the CPU")
    gpu.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                     help="mixed precision: forward passes and losses under autocast in bf16 or fp16 (fp16 with a "
                          "loss scaler saved in checkpoints); off keeps float32 and exact, bitwise resume")
    gpu.add_argument("--compile", action="store_true",
                     help="torch.compile the model (slow first steps; checkpoints load without it); needs a C++ "
                          "compiler on CPU, triton on GPU")
    gpu.add_argument("--sync-bn", action="store_true",
                     help="BatchNorm with the batch statistics of all processes (SyncBatchNorm) under DDP; GPUs only")
    gpu.add_argument("--tf32", choices=["on", "off"], default=None,
                     help="allow TensorFloat-32 in float32 matrix products and cuDNN convolutions on Ampere and "
                          "later GPUs (faster, about 1e-3 relative difference from CPU results); default: "
                          "PyTorch's own (matmul off, cuDNN on)")

    run.add_argument("--dist-backend", choices=["gloo", "nccl", "mpi"], default=None,
                     help="torch.distributed backend (default: nccl on GPU, gloo on CPU)")
    run.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S, metavar="SECONDS",
                     help="how long processes wait for each other: for all to start, and in each collective "
                          "(e.g. while rank 0 writes a checkpoint); default: torch's own, %(default)g s. A process "
                          "that fails with an error stops the others at once whatever this is; it bounds only "
                          "the wait for one that dies silently (killed, out of memory) under nccl, or a hang")
    run.add_argument("--log-interval", type=int, default=100, help="batches between logged training losses")
    run.add_argument("--detect-anomaly", action="store_true", help="enable autograd anomaly detection (slow)")
    p.set_defaults(stage=("map2map.train", "TrainConfig"))
