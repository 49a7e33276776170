"""Smoothing moves products' input outlier channels into their weights without changing what the graph computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mrl.export import sensitivity, smooth

WIDTH = 16
HOT = [2, 9]  # channels far larger than the rest


def _graph() -> onnx.ModelProto:
    """Three ways a product's input is made: a LayerNorm (whose output a Shape also reads), an RMSNorm-style Mul by a
    weight vector shared with another Mul, and a Relu (nothing to fold into). Each input's hot channels are ~100x
    the rest, and the weights that read them ~100x smaller, so the graph's outputs are of ordinary size."""
    rng = np.random.default_rng(0)
    boost = np.ones(WIDTH, np.float32)
    boost[HOT] = 100.0

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((WIDTH, 8)) / boost[:, None]).astype(np.float32), name)

    inits = [
        numpy_helper.from_array(boost * rng.uniform(0.5, 1.5, WIDTH).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32) * 0.1, "beta"),
        numpy_helper.from_array(boost.copy(), "scale"),
        *(weight(f"w{i}") for i in range(4)),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("Shape", ["ln"], ["ln_shape"]),
        helper.make_node("MatMul", ["ln", "w0"], ["y0"]),
        helper.make_node("MatMul", ["ln", "w1"], ["y1"]),
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Mul", ["scale", "x"], ["also_scaled"]),  # the same vector, read elsewhere
        helper.make_node("MatMul", ["scaled", "w2"], ["y2"]),
        helper.make_node("Relu", ["scaled"], ["relu"]),
        helper.make_node("MatMul", ["relu", "w3"], ["y3"]),
    ]
    outputs = ["y0", "y1", "y2", "y3", "also_scaled", "ln_shape"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, WIDTH])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs[:-1]]
        + [helper.make_tensor_value_info("ln_shape", TensorProto.INT64, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, 12, WIDTH)).astype(np.float32)} for _ in range(3)]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_smoothing_folds_where_it_can_inserts_a_mul_where_it_cannot_and_computes_the_same(tmp_path):
    model, feeds = _graph(), _feeds()
    result = smooth.smooth(model, feeds, tmp_path)
    # relu's input is `scaled`, which the MatMul w2 also reads: `scaled` cannot be folded for w2 alone either
    assert (result.inputs, result.folded, result.inserted) == (3, 1, 2), result
    assert sum(n.op_type == "Mul" for n in result.model.graph.node) == 2 + 2
    for feed in feeds:
        for want, got in zip(_run(model, feed), _run(result.model, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    gamma = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}["gamma"]
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["gamma"]
    assert np.ptp(np.log(np.abs(gamma))) < np.ptp(np.log(np.abs(original))) / 2  # the hot channels came down


def test_a_shared_scale_is_copied_not_changed_for_its_other_readers(tmp_path):
    model = _graph()
    graph = model.graph
    # Only w2 reads `scaled` now: the Mul's vector, shared with another Mul, can take the scale.
    relu = next(n for n in graph.node if n.op_type == "Relu")
    relu.input[0] = "x"
    result = smooth.smooth(model, _feeds(), tmp_path)
    assert result.folded == 2, result  # the LayerNorm, and the Mul's own copy of `scale`
    names = {t.name for t in result.model.graph.initializer}
    assert "scale" in names and any(name.startswith("scale_smoothed") for name in names)
    for feed in _feeds():
        for want, got in zip(_run(model, feed), _run(result.model, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_smoothing_cuts_the_emulated_int8_error_of_a_product_with_hot_input_channels(tmp_path):
    model, feeds = _graph(), _feeds()
    stats = sensitivity.activation_stats(model, ["ln"], feeds, tmp_path)["ln"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    alpha, error, plain = smooth.choose_alpha(stats, np.concatenate([inits["w0"], inits["w1"]], axis=1))
    assert alpha is not None and error < plain / 10, (alpha, error, plain)


def test_the_smoothing_scale_balances_activation_and_weight_ranges():
    x_max, w_max = np.array([100.0, 1.0, 4.0, 0.0]), np.array([0.01, 1.0, 0.25, 2.0])
    s = smooth.smoothing_scale(x_max, w_max, 0.5)
    live = x_max > 0
    ratio = (x_max / s)[live] / (w_max * s)[live]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # alpha 0.5: the same balance in every channel
    assert s[3] == s[1]  # a channel that is always zero keeps the common factor


def _hot_columns(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight whose output channels HOT are ~100x the rest, and the weight that reads them ~100x smaller."""
    boost = np.ones(cols, np.float32)
    boost[HOT] = 100.0
    make = rng.standard_normal((rows, cols)).astype(np.float32) * boost
    read = (rng.standard_normal((cols, 8)) / boost[:, None]).astype(np.float32)
    return make, read


def _model(nodes, inits, outputs, opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, WIDTH])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _assert_same(model: onnx.ModelProto, smoothed: onnx.ModelProto) -> None:
    for feed in _feeds():
        for want, got in zip(_run(model, feed), _run(smoothed, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_gated_mlp_takes_the_scale_in_its_up_projection(tmp_path):
    rng = np.random.default_rng(2)
    up, down = _hot_columns(rng, WIDTH, WIDTH)
    inits = [
        numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "gate_w"),
        numpy_helper.from_array(up, "up_w"),
        numpy_helper.from_array(down, "down_w"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "gate_w"], ["gate"]),
        helper.make_node("Sigmoid", ["gate"], ["act"]),
        helper.make_node("MatMul", ["x", "up_w"], ["up"]),
        helper.make_node("Mul", ["act", "up"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "down_w"], ["y"]),
    ]
    model = _model(nodes, inits, ["y"])
    result = smooth.smooth(model, _feeds(), tmp_path)
    assert result.folded == 1, result  # `hidden`, into up_w's columns (x, a graph input, may get a Mul)
    assert not any(n.op_type == "Mul" and "hidden" in n.input for n in result.model.graph.node)
    _assert_same(model, result.model)


def test_fused_attention_takes_the_scale_in_its_value_weights(tmp_path):
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((WIDTH, 3 * WIDTH)).astype(np.float32) * 0.3
    values, out = _hot_columns(rng, WIDTH, WIDTH)
    qkv[:, 2 * WIDTH :] = values
    inits = [
        numpy_helper.from_array(qkv, "qkv_w"),
        numpy_helper.from_array(rng.standard_normal(3 * WIDTH).astype(np.float32) * 0.1, "qkv_b"),
        numpy_helper.from_array(out, "out_w"),
    ]
    nodes = [
        helper.make_node("Attention", ["x", "qkv_w", "qkv_b"], ["context"], domain="com.microsoft", num_heads=2),
        helper.make_node("MatMul", ["context", "out_w"], ["y"]),
    ]
    model = _model(nodes, inits, ["y"], opsets=(("", 17), ("com.microsoft", 1)))
    result = smooth.smooth(model, _feeds(), tmp_path, op_types=("MatMul",))
    assert (result.folded, result.inserted) == (1, 0), result
    _assert_same(model, result.model)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(weights["qkv_w"][:, : 2 * WIDTH], qkv[:, : 2 * WIDTH])  # Q and K untouched


def test_a_fold_that_would_change_the_function_is_caught_and_smoothing_dropped(tmp_path, monkeypatch, caplog):
    from mrl.export import fold

    model = _graph()
    wrong = fold.Target(node=0, init="beta")  # the LayerNorm's shift alone: its scale would stay

    monkeypatch.setattr(fold, "plan", lambda index, x, products, width: [wrong] if x == "ln" else None)
    result = smooth.smooth(model, _feeds(), tmp_path)
    assert result.smoothed == 0 and result.dropped and result.model is model, result
    assert "smoothing changed what the fp32 graph computes" in caplog.text


def test_mul_nodes_go_to_the_right_products_when_two_inputs_products_interleave(tmp_path):
    """x's products come before and after r's: each inserted Mul must feed its own input's products."""
    rng = np.random.default_rng(2)
    boost = np.ones(WIDTH, np.float32)
    boost[HOT] = 100.0
    weights = [
        numpy_helper.from_array((rng.standard_normal((WIDTH, 8)) / boost[:, None]).astype(np.float32), f"w{i}")
        for i in range(3)
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["x", "w0"], ["ya"]),
        helper.make_node("MatMul", ["r", "w1"], ["yb"]),
        helper.make_node("MatMul", ["x", "w2"], ["yc"]),
    ]
    graph = helper.make_graph(
        nodes,
        "interleaved",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, WIDTH])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("ya", "yb", "yc")],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": (rng.standard_normal((4, 12, WIDTH)) * boost).astype(np.float32)} for _ in range(3)]
    result = smooth.smooth(model, feeds, tmp_path)
    assert (result.inserted, result.dropped) == (2, False), result
    readers = {n.output[0]: n.input[0] for n in result.model.graph.node if n.op_type == "MatMul"}
    assert readers == {"ya": "x_smoothed", "yb": "r_smoothed", "yc": "x_smoothed"}, readers
    for feed in feeds:
        for want, got in zip(_run(model, feed), _run(result.model, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
