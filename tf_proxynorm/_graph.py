"""Rebuilding Keras functional / Sequential graphs layer by layer (used by convert and fold).

A `Graph` lists the nodes of a model in execution order and who consumes each tensor;
`Graph.rebuild` calls a function on every node with the already-rebuilt input tensors and
makes a new model of the results. Layers that are kept are cloned (`call_clone`), so the new
model never shares weights with the original.

This module is the one place that reads Keras' functional-graph internals (a Keras upgrade
that changes them breaks this file only; the other framework internals are in
`tf_proxynorm._backend`). Private attributes it relies on, and why:

- `Functional._nodes_by_depth`: the nodes of a functional model by depth, the execution
  order (`is_graph_model` also uses it to tell a functional model from a subclassed one);
- `Sequential._functional`: the functional model a built Sequential model runs;
- `Functional._inputs_struct`, `Functional._outputs_struct`: the nesting of the model's
  inputs and outputs (a dict or list), to give the rebuilt model the same;
- `KerasTensor._keras_history`: the `InputLayer` of a model input, for its name.

The nodes themselves are Keras' internal `Node` class (not exported by `keras`); its
unprefixed attributes `operation`, `is_input`, `input_tensors`, `outputs` and `arguments`
(`fill_in`, `kwargs`) are read here and by the modules that walk a `Graph` (convert, fold,
absorb, calibrate).
"""

import collections

import keras


def is_graph_model(layer):
    """Whether `layer` is a functional or Sequential Keras model (whose graph we can walk)."""
    if isinstance(layer, keras.Sequential):
        return True
    return isinstance(layer, keras.Model) and getattr(layer, "_nodes_by_depth", None) is not None


def check_graph_model(model, what):
    """Raises a ValueError unless `model` is a functional or built Sequential model."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"{what} expects a Keras model. Received: model={model!r}")
    if not is_graph_model(model):
        raise ValueError(
            f"{what} supports functional and Sequential Keras models only: a subclassed "
            "model's call() is Python code whose graph cannot be rewritten. Rebuild it with the "
            "functional API, or swap its layers by hand. "
            f"Received: model={model.name!r} of class {type(model).__name__}")
    if isinstance(model, keras.Sequential) and getattr(model, "_functional", None) is None:
        raise ValueError(
            f"{what} needs a built Sequential model with a known input shape: start it with "
            "`keras.Input(shape)` or call `model.build(input_shape)`. "
            f"Received: model={model.name!r}")


class Graph:
    """The nodes of a functional or Sequential model, in execution order."""

    def __init__(self, model, what):
        check_graph_model(model, what)
        self.model = model
        self.functional = model._functional if isinstance(model, keras.Sequential) else model
        by_depth = self.functional._nodes_by_depth
        self.nodes = [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]
                      if node.operation is not None and not node.is_input]
        self._consumers = collections.defaultdict(list)
        self._calls = collections.Counter()
        for node in self.nodes:
            self._calls[id(node.operation)] += 1
            for tensor in node.input_tensors:
                self._consumers[id(tensor)].append(node)
        self._output_ids = {id(t) for t in self.functional.outputs}

    def num_calls(self, layer):
        """How many times `layer` is called in this graph."""
        return self._calls[id(layer)]

    def is_output(self, tensor):
        """Whether `tensor` is an output of the model."""
        return id(tensor) in self._output_ids

    def consumers_of(self, tensor):
        """The nodes that take `tensor` as input (a list, empty for none; a model output
        may have consumers too: see `is_output`)."""
        return list(self._consumers.get(id(tensor), ()))

    def only_consumer(self, tensor):
        """The single node consuming `tensor` (and nothing else does, not even the output)."""
        consumers = self.consumers_of(tensor)
        return consumers[0] if not self.is_output(tensor) and len(consumers) == 1 else None

    def rebuild(self, call_node):
        """Builds a new model calling `call_node(node, args, kwargs, rewriter)` on every node.

        `call_node` returns the node's new output tensor(s); it may call
        `rewriter.set_output(old_tensor, new_tensor)` itself (e.g. to route a node's output
        elsewhere) and `rewriter.route(consumer_node, old_tensor, new_tensor)` to give one
        consumer a different tensor than the others. A Sequential model comes back
        Sequential.
        """
        rewriter = _Rewriter()
        new_inputs = []
        for x in self.functional.inputs:
            new = keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse,
                              name=x._keras_history.operation.name)
            rewriter.set_output(x, new)
            new_inputs.append(new)
        for node in self.nodes:
            args, kwargs = node.arguments.fill_in(rewriter.inputs_of(node))
            outputs = call_node(node, args, kwargs, rewriter)
            if outputs is None:
                continue
            for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
                rewriter._outputs.setdefault(id(old), new)
        outputs = [rewriter._outputs[id(t)] for t in self.functional.outputs]
        outputs = keras.tree.pack_sequence_as(self.functional._outputs_struct, outputs)
        inputs = keras.tree.pack_sequence_as(self.functional._inputs_struct, new_inputs)
        functional = keras.Model(inputs, outputs, name=self.model.name)
        if not isinstance(self.model, keras.Sequential):
            return functional
        return keras.Sequential([new_inputs[0]] + functional.layers[1:], name=self.model.name)


class _Rewriter:
    """What `Graph.rebuild` passes to its callback: the new tensor of each old one."""

    def __init__(self):
        self._outputs = {}                          # id(old tensor) -> new tensor
        self._edges = collections.defaultdict(dict)  # id(node) -> {id(old): new}
        self._clones = {}

    def set_output(self, old, new):
        """Every later consumer of the old tensor `old` gets `new` (unless `route` gives it
        another one). Set by `call_node` for its own node's output, it wins over the
        tensor `call_node` returns."""
        self._outputs[id(old)] = new

    def route(self, consumer, old, new):
        """The node `consumer` (only) gets `new` where its old input was `old`."""
        self._edges[id(consumer)][id(old)] = new

    def inputs_of(self, node):
        """`{id(old tensor): new tensor}` as `node` sees it (`route` first)."""
        return collections.ChainMap(self._edges.get(id(node), {}), self._outputs)

    def call_clone(self, layer, args, kwargs, clone=None):
        """Calls the clone of `layer` (made once, so shared layers stay shared) on new inputs.

        `clone` (a ready layer, e.g. a converted nested model) replaces the default clone,
        a layer from `layer`'s config whose weights are copied after its first call.
        Returns `(new_layer, outputs)`. Stateless operations (`keras.ops` calls) and layers
        whose config does not round-trip (e.g. a `Lambda` of a closure) are reused as is.
        """
        new = self._clones.get(id(layer))
        if new is not None:
            return new, new(*args, **kwargs)
        new = clone if clone is not None else _clone_layer(layer)
        self._clones[id(layer)] = new
        outputs = new(*args, **kwargs)
        if clone is None and new is not layer:
            weights = layer.get_weights()
            if weights:
                new.set_weights(weights)
        return new, outputs


def _clone_layer(layer):
    if not isinstance(layer, keras.layers.Layer):
        return layer
    try:
        return type(layer).from_config(layer.get_config())
    except Exception:  # noqa: BLE001 - any layer whose config does not round-trip is reused
        return layer
