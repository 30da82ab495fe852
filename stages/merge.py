"""Stage `merge`: fold the trained FT into the student's first linear layer (NORM's deployable model).

Reads ``distill/norm_student.pt``, calls ``models.merge.merge_norm_student`` on it in eval mode and saves
the result as an ordinary vanilla checkpoint (``model.pt``, loadable with ``load_model``), plus
``merge.json`` saying what was folded and proving the architecture is the vanilla one again.
"""
from __future__ import annotations

import torch.nn as nn

from models.merge import find_first_linear, merge_norm_student
from models.registry import create_model
from stages.lib.checkpoints import load_norm_student, save_model
from stages.lib.context import StageContext
from stages.lib.errors import PipelineError
from stages.lib.flops import count_params
from stages.lib.io import sha256_file
from stages.lib.verify_checks import state_signature


def module_name(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``root`` (e.g. ``head.fc``)."""
    for name, m in root.named_modules():
        if m is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def run(ctx: StageContext) -> dict:
    src = ctx.artifact("distill", "norm_student")
    ns, meta = load_norm_student(src)
    ns.eval()
    name, num_classes, in_chans = meta["model"], int(meta["num_classes"]), int(meta["in_chans"])
    try:
        merged = merge_norm_student(ns)
    except ValueError as e:
        raise PipelineError(str(e)) from None

    fresh = create_model(name, num_classes=num_classes, in_chans=in_chans)
    keys_equal = state_signature(merged) == state_signature(fresh)
    _, fc = find_first_linear(merged.head)
    fc_name = module_name(merged, fc)
    unmerged_params, params = count_params(ns), count_params(merged)
    info = {
        "student": name,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "C_s": ns.ft.student_channels,
        "C_t": ns.ft.teacher_channels,
        "N": ns.ft.n,
        "residual": ns.ft.residual,
        "ft": "default (x + contract(expand(x)))" if ns.ft.residual else "plain (contract(expand(x)))",
        "fc_layer": fc_name,
        "fc_shape": list(fc.weight.shape),
        "params": {"unmerged": unmerged_params, "merged": params, "ft_removed": unmerged_params - params,
                   "vanilla": count_params(fresh)},
        "state_dict_matches_vanilla": keys_equal,
        "source": {"file": f"distill/{src.name}", "sha256": sha256_file(src)},
    }
    ctx.write_json("merge.json", info)
    if not keys_equal:
        raise PipelineError(f"merged {name} does not have the vanilla {name} state_dict keys/shapes; "
                            "the merge must return the student's own class (see merge.json)")
    save_model(ctx.out_dir / "model.pt", merged, name=name, num_classes=num_classes, in_chans=in_chans,
               merged_from=info["source"]["sha256"])
    ctx.log(f"merged FT (C_s={info['C_s']}, C_t={info['C_t']}, N={info['N']}, residual={info['residual']}) into "
            f"{fc_name}: {unmerged_params:,} -> {params:,} parameters")
    return {"params": params, "unmerged_params": unmerged_params, "ft_params_removed": unmerged_params - params}
