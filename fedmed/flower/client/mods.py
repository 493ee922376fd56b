"""Client-level DP, the site's part: it clips its update with Flower's clipping mods before it leaves
(the server adds the noise: fedmed.flower.server.client_dp)."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace

from fedmed.core.errors import FedmedError
from fedmed.flower.wire import CLIPPING_MODE, CONFIG, HELD

from .common import refuse, session_for


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's fixed or adaptive clipping mod when the run asks for client-level DP."""
    mode = msg.content[CONFIG].get(CLIPPING_MODE) if CONFIG in msg.content else None
    clipping = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}.get(str(mode))
    if clipping is None:
        return call_next(msg, context)
    if HELD in msg.content:
        # Flower's clipping mods want the weights as the message's only ArrayRecord: the session takes the held
        # values (model.init, model.freeze, [pretrain]) first, and the handler finds them there.
        try:
            session_for(msg, context)
        except FedmedError as error:
            return refuse(msg, error)
        del msg.content[HELD]
    return clipping(msg, context, call_next)


def clip_update_inplace(update: list[np.ndarray], *, clipping_norm: float) -> bool:
    """Clip a site's update (local - global) to the norm; True when it was clipped (Flower's norm bit).

    Under SecAgg+ the site clips inside its masking step: the server never sees the update to clip."""
    return adaptive_clip_inputs_inplace(update, clipping_norm)
