import os
import re
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.mesh import host_order, parse_axes


def test_axes_in_order_and_explicit():
    m = tx.mesh(data=2, model=4)
    assert m.axis_names == ("data", "model")
    assert dict(m.shape) == {"data": 2, "model": 4}
    assert all(t == AxisType.Auto for t in m.axis_types)
    assert sorted(d.id for d in m.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "axes, shape",
    [
        ({"data": -1}, (8,)),
        ({"data": -1, "model": 2}, (4, 2)),
        ({"a": 2, "b": -1, "c": 2}, (2, 2, 2)),
    ],
)
def test_minus_one_takes_the_rest(axes, shape):
    assert tx.mesh(**axes).devices.shape == shape


def test_given_devices():
    m = tx.mesh(devices=jax.devices()[:4], data=-1)
    assert m.devices.shape == (4,)
    assert [d.id for d in m.devices.flat] == [0, 1, 2, 3]


def test_sizes_must_multiply_to_device_count():
    with pytest.raises(
        tx.MeshError,
        match=r"multiply to 6, but there are 8 devices \(8 cpu\)"
        r" in 1 process.*try tx.mesh\(data=-1, model=2\)",
    ):
        tx.mesh(data=3, model=2)
    with pytest.raises(
        tx.MeshError,
        match=r"the sized axes multiply to 3, which does not divide "
        r"the 8 devices.*axis 'data' cannot take the rest; "
        r"try tx.mesh\(data=-1, model=2\)",
    ):
        tx.mesh(data=-1, model=3)


@pytest.mark.parametrize("size", [0, -2, 2.0, True, "2"])
def test_bad_sizes(size):
    with pytest.raises(tx.MeshError, match="size of axis 'data' must be a positive integer or -1"):
        tx.mesh(data=size)


def test_one_minus_one_only():
    with pytest.raises(tx.MeshError, match="only one axis may have size -1; 'data', 'model'"):
        tx.mesh(data=-1, model=-1)


def test_names():
    with pytest.raises(tx.MeshError, match="axis names must be non-empty"):
        tx.mesh(**{"": 8})
    with pytest.raises(tx.MeshError, match="no axes given"):
        tx.mesh()


def test_bad_devices():
    with pytest.raises(tx.MeshError, match="devices must be a sequence of jax devices"):
        tx.mesh(devices=4)
    d = jax.devices()
    with pytest.raises(tx.MeshError, match="holds a device more than once"):
        tx.mesh(devices=[d[0], d[0]], data=2)


def test_host_order_makes_first_axis_span_processes():
    devs = [SimpleNamespace(id=i, process_index=p) for i, p in enumerate([1, 0, 1, 0, 1, 0, 1, 0])]
    ordered = host_order(devs)
    assert [d.process_index for d in ordered] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.id for d in ordered] == [1, 3, 5, 7, 0, 2, 4, 6]  # order kept within a process


# ---------------------------------------------------------------- axis names XLA takes (issue 15)
@pytest.mark.parametrize(
    "name, shown",
    [
        ("daté", "'é'"),  # non-ASCII: XLA aborts the process while compiling
        ("数据", "'数', '据'"),
        ("a\u00a0b", "'\\xa0'"),  # a non-breaking space
        ("a\\b", "'\\\\'"),  # a backslash: a segfault in some places
        ("a\nb", "'\\n'"),  # control characters: likewise, and invisible in messages
        ("a\x12", "'\\x12'"),
        ("a\x7fb", "'\\x7f'"),
    ],
    ids=["accent", "cjk", "nbsp", "backslash", "newline", "control", "delete"],
)
def test_axis_names_xla_cannot_take_are_mesh_errors(name, shown):
    # Before: tx.mesh returned a mesh, and the first compiled step on it aborted the process.
    with pytest.raises(
        tx.MeshError,
        match=rf"axis name {re.escape(repr(name))} has {re.escape(shown)}, which XLA cannot take "
        r"in an axis name \(it aborts the process\). Use printable ASCII: letters, digits, "
        r"spaces and punctuation other than a backslash, e.g. 'data' or 'model_2'.$",
    ):
        tx.mesh(**{"data": 2, name: 4})


def test_axis_names_xla_takes_work_in_a_compiled_step():
    # Any printable ASCII but the backslash: spaces, quotes, hyphens, digits first or alone.
    names = ('a "quoted" name', "0-th")
    m = tx.mesh(**{names[0]: 2, names[1]: -1})
    assert m.axis_names == names
    x = jax.device_put(jnp.arange(8.0), NamedSharding(m, P(names)))
    total = jax.jit(
        jax.shard_map(
            lambda a: jax.lax.psum(a.sum(), names), mesh=m, in_specs=P(names), out_specs=P()
        )
    )(x)
    assert float(total) == 28.0


def test_non_ascii_axis_names_still_abort_xla():
    # Why tx.mesh refuses them (measured on jax 0.10.2): if this starts passing, XLA takes
    # non-ASCII names and tx.mesh may allow them. A subprocess, since the process aborts.
    code = (
        "import jax, numpy as np\n"
        "jax.config.update('jax_num_cpu_devices', 2)\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "m = Mesh(np.asarray(jax.devices()), ('dat\\u00e9',))\n"
        "x = jax.device_put(np.arange(4.0), NamedSharding(m, P('dat\\u00e9')))\n"
        "jax.jit(lambda a: a * 2)(x).block_until_ready()\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "Unknown escape sequence" in run.stderr, run.stderr[-2000:]


def test_parse_axes():
    assert parse_axes("data=2,model=-1") == {"data": 2, "model": -1}
    assert parse_axes(["data=2", " model = 4 "]) == {"data": 2, "model": 4}
    for spec, error in [
        (
            ["data=2", "data=4"],
            r"axis 'data' is given twice \(data=2, then data=4\); give each "
            r"axis once, e.g. data=4.$",
        ),
        ("data=2,model=4,data=2", r"axis 'data' is given twice"),
        (["data"], r"axis 'data' must look like name=size, e.g. data=2 \(or data=-1\).$"),
        (["=2"], r"axis '=2' must look like name=size"),
        (
            ["data=x"],
            r"axis 'data=x': the size must be an integer \(-1: all remaining devices\); "
            r"got 'x'. Write e.g. data=2.$",
        ),
        (["data=2.0"], r"got '2.0'"),
        (["data=2=3"], r"got '2=3'"),
        ("", r"no axes given in ''; give name=size pairs, e.g. data=2,model=4.$"),
    ]:
        with pytest.raises(tx.MeshError, match=error):
            parse_axes(spec)


def test_an_empty_devices_list_is_an_error():
    # It returned an empty Mesh(), and a step failed later with a ZeroDivisionError.
    with pytest.raises(tx.MeshError, match="devices is empty"):
        tx.mesh(devices=[], data=-1)
