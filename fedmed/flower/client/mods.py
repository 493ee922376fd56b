"""Client-level DP, the site's part: it clips its update with Flower's clipping mods before it leaves
(the server adds the noise: fedmed.flower.server.client_dp)."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace

from fedmed.flower.wire import CLIPPING_MODE, CONFIG


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's fixed or adaptive clipping mod when the run asks for client-level DP."""
    mode = msg.content[CONFIG].get(CLIPPING_MODE) if CONFIG in msg.content else None
    if mode == "fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def clip_update_inplace(update: list[np.ndarray], *, clipping_norm: float) -> bool:
    """Clip a site's update (local - global) to the norm; True when it was clipped (Flower's norm bit).

    Under SecAgg+ the site clips inside its masking step: the server never sees the update to clip."""
    return adaptive_clip_inputs_inplace(update, clipping_norm)
