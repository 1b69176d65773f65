"""Placeholder until the fused op lands: the only module aware of the compiled library."""


def fused_op_available():
    return False


def unavailable_reason():
    return "the fused op is not built in this version"


def can_use_fused(x, activation):
    return False


def group_norm_act(x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, axis, epsilon,
                   activation):
    raise NotImplementedError(unavailable_reason())


def why_not_fused(x, activation):
    return unavailable_reason()
