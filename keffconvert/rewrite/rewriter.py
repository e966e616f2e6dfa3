"""Rebuild a model with every planned chain M[->B][->A] swapped for the kEffNet sub-architecture.

The walk is `transform.rebuild` (Keras' `clone_model` level by level): `Rewriter.call` replaces a
chain's conv by the sub-architecture and lets the chain's BN and activation pass their input
through. Only what the `Analysis` decided is changed; every other layer is cloned from its config
under its own name.
"""

from keffconvert.graph.transform import Transform, clone_layer, rebuild


class Rewriter(Transform):
    """Holds what was cloned and what was built, so weights can be copied once the model is built."""

    def __init__(self, analysis):
        self.analysis = analysis
        self.cloned = []  # (clone, original) for layers kept as they were
        self.replacements = []  # (Chain, Replacement)

    def rewrite(self, model):
        return rebuild(model, self)

    def needs_functional(self, model):
        # The replacement branches and sums, which a Sequential cannot hold: go Functional.
        return self.analysis.converts_directly(model)

    def clone(self, layer, level):
        clone = clone_layer(layer)
        if self.analysis.chain_of(layer) is None and not self.analysis.is_absorbed(layer):
            self.cloned.append((clone, layer))
        return clone

    def call(self, original, layer, level, *args, **kwargs):
        chain = self.analysis.chain_of(original)
        if chain is not None:
            replacement = Replacement(chain)
            self.replacements.append((chain, replacement))
            return replacement(args[0])
        if self.analysis.is_absorbed(original):
            return args[0]
        return layer(*args, **kwargs)


class Replacement:
    """The layers that stand in for one chain, built from its `NewLayer` descriptions:
    K, B', A, interleave, then L, B'', A and the sum (absent roles are None)."""

    ROLES = ("k", "k_bn", "k_act", "interleave", "l", "l_bn", "l_act", "sum")

    def __init__(self, chain):
        built = {layer.role: layer.build() for layer in chain.new_layers}
        for role in self.ROLES:
            setattr(self, role, built.get(role))

    def __call__(self, x):
        k_out = _apply([self.k, self.k_bn, self.k_act], x)
        mixed = self.interleave(k_out) if self.interleave is not None else k_out
        if self.l is None:
            return mixed
        l_out = _apply([self.l, self.l_bn, self.l_act], mixed)
        return self.sum([l_out, k_out])


def _apply(layers, x):
    for layer in layers:
        if layer is not None:
            x = layer(x)
    return x
