from types import SimpleNamespace

import jax
import pytest
from jax.sharding import AxisType

import titanax as tx
from titanax.mesh import host_order


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
