"""Reading collectives from compiled HLO: the three replica-group syntaxes, on literal lines
and on programs XLA compiles (jax 0.10.2 on CPU prints all three)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from titanax.parallel import hlo

ALL = ("data", "model")
BLOCKS = P(*ALL)


@pytest.fixture(scope="module")
def mesh():
    # Auto axes: the jit programs below let XLA's partitioner choose the collectives.
    return jax.make_mesh((2, 4), ALL, axis_types=(AxisType.Auto,) * 2)


def line(groups, kind="all-reduce", result="f32[4,4]{1,0}"):
    """One instruction as jax 0.10.2's ``compiled.as_text()`` prints it."""
    return f"  %x.1 = {result} {kind}(%p), channel_id=1, {groups}, use_global_device_ids=true"


# Literal lines: every syntax, and the mesh axes its groups span on a (data=2, model=4) mesh.
# The mesh-form ones are copied from compiled programs (the test ids say which), or are the
# documented cases of XLA's MeshAxesReplicaGroupList (xla/hlo/ir/replica_group.cc).
LITERALS = {
    "list model": ("replica_groups={{0,1,2,3},{4,5,6,7}}", ("model",)),
    "list data": ("replica_groups={{0,4},{1,5},{2,6},{3,7}}", ("data",)),
    "list all": ("replica_groups={{0,4,1,5,2,6,3,7}}", ALL),
    "list empty is all devices": ("replica_groups={}", ALL),
    "no groups is all devices": ("to_apply=%add", ALL),
    "iota model": ("replica_groups=[2,4]<=[8]", ("model",)),
    "iota all": ("replica_groups=[1,8]<=[8]", ALL),
    "iota transposed data": ("replica_groups=[4,2]<=[2,4]T(1,0)", ("data",)),
    "iota transposed all": ("replica_groups=[1,8]<=[2,4]T(1,0)", ALL),
    "mesh gather data": ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", ("data",)),
    "mesh sum model": ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", ("model",)),
    "mesh sum all": ("replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}", ALL),
    "mesh size-1 axis": ("replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_1'}", ()),
    "mesh 3 axes": ("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4] {'axis_1'}", ("data",)),
    "mesh device_ids iota": (
        "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}",
        ("model",),
    ),
    "mesh device_ids list": (
        "replica_groups=mesh['x'=2,'y'=4], device_ids=(0,2,1,3,4,6,5,7) {'x'}",
        ("data",),
    ),
    "mesh sub-axis": (
        "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0':(2)2}",
        ("model",),
    ),
    "mesh two sub-axes": ("replica_groups=mesh['x'=8] {'x':(1)2,'x':(4)2}", ALL),
    "mesh two axes": ("replica_groups=mesh['x'=2,'y'=4] {'y','x'}", ALL),
    "mesh names with spaces": ("replica_groups=mesh['a b'=2,'y'=4] {'a b'}", ("data",)),
    "mesh bare names": ("replica_groups=mesh[x=2,y=4] {y}", ("model",)),
}


@pytest.mark.parametrize("groups, axes", LITERALS.values(), ids=LITERALS.keys())
def test_axes_of_every_syntax(mesh, groups, axes):
    (c,) = hlo.collectives(line(groups), mesh)
    assert (c.kind, c.axes, c.bytes, c.shapes) == ("all-reduce", axes, 64, ("f32[4,4]",))


# The exact groups, in XLA's order, where the axes alone would not tell a wrong reading apart.
GROUPS = {
    "[4,2]<=[2,4]T(1,0)": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "mesh['x'=2,'y'=4] {'y','x'}": [[0, 4, 1, 5, 2, 6, 3, 7]],
    "mesh['x'=2,'y'=4], device_ids=(0,2,1,3,4,6,5,7) {'x'}": [[0, 4], [2, 6], [1, 5], [3, 7]],
    # replica_group.cc: "{a:(1)2, a:(4)2} -> reshape [8]->[2,2,2], aggregate over [0,2]"
    "mesh['x'=8] {'x':(1)2,'x':(4)2}": [[0, 1, 4, 5], [2, 3, 6, 7]],
    "mesh['x'=8] {'x':(2)2}": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "mesh['x'=4,'y'=2], device_ids=([2,2,2]T(0,2,1)) {'x':(2)2}": [[0, 1], [2, 3], [4, 5], [6, 7]],
}


@pytest.mark.parametrize("groups, expected", GROUPS.items(), ids=GROUPS.keys())
def test_replica_groups_exactly(groups, expected):
    assert hlo.replica_groups(line(f"replica_groups={groups}"), 8) == expected


def test_reduce_scatter_bytes_count_the_group_in_the_mesh_form(mesh):
    rs = line("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", "reduce-scatter", "f32[1,4]")
    assert hlo.collectives(rs, mesh) == [
        hlo.Collective("reduce-scatter", ("model",), 64, ("f32[1,4]",))
    ]


UNREADABLE = {
    "an unknown form": ("replica_groups=groups<x>", "none of the list, iota or mesh forms"),
    "an axis not in the mesh": ("replica_groups=mesh['x'=2,'y'=4] {'z'}", "axis 'z' is not in"),
    "too few device ids": (
        "replica_groups=mesh['x'=2,'y'=4], device_ids=(0,1,2,3) {'x'}",
        "4 devices",
    ),
    "an iota of the wrong size": ("replica_groups=[2,4]<=[6]", "cannot reshape"),
}


@pytest.mark.parametrize("groups, why", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_groups_raise_instead_of_meaning_all_devices(mesh, groups, why):
    with pytest.raises(ValueError, match=f"cannot read replica_groups=.*{why}"):
        hlo.collectives(line(groups), mesh)


# Compiled programs. Each test also asserts the syntax XLA printed, so that it pins the parser
# on that syntax and says so when a new XLA prints another.


def compiled(f, *args, **options):
    return f.lower(*args).compile(compiler_options=options or None).as_text()


def collective_lines(text, mesh):
    return [ln for ln in text.splitlines() if hlo.collectives(ln, mesh)]


def test_shard_map_collectives_print_lists(mesh):
    x = jnp.ones((8, 16), jnp.float32)  # blocks of (4, 4): 64 bytes

    def smap(f, out_specs=BLOCKS):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=BLOCKS, out_specs=out_specs))

    ring = [(i, (i + 1) % 4) for i in range(4)]
    programs = {
        "psum model": (smap(lambda a: jax.lax.psum(a, "model"), P("data")), ("model",)),
        "psum data": (smap(lambda a: jax.lax.psum(a, "data"), P(None, "model")), ("data",)),
        "psum both": (smap(lambda a: jax.lax.psum(a, ALL), P()), ALL),
        "ppermute": (smap(lambda a: jax.lax.ppermute(a, "model", ring)), ("model",)),
    }
    for name, (f, axes) in programs.items():
        text = compiled(f, x)
        assert "replica_groups={{" in text or "source_target_pairs={{" in text, name
        (c,) = hlo.collectives(text, mesh)
        assert (c.axes, c.bytes) == (axes, 64), name

    scatter = smap(
        lambda a: jax.lax.psum_scatter(a, "model", scatter_dimension=0, tiled=True), P(ALL)
    )
    assert hlo.collectives(compiled(scatter, x), mesh) == [
        hlo.Collective("reduce-scatter", ("model",), 64, ("f32[1,4]",))
    ]
    a2a = smap(lambda a: jax.lax.all_to_all(a, "data", 1, 0, tiled=True))
    assert hlo.summary(hlo.collectives(compiled(a2a, x), mesh)) == {("all-to-all", ("data",)): 1}
    assert hlo.collectives(compiled(a2a, x), mesh)[0].bytes == 64  # two (4, 2) pieces


def test_partial_manual_shard_map(mesh):
    f = jax.shard_map(
        lambda a: jax.lax.psum(a, "data"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P(),
        axis_names={"data"},
    )
    text = compiled(jax.jit(f), jnp.ones((8, 16), jnp.float32))
    assert hlo.collectives(text, mesh) == [
        hlo.Collective("all-reduce", ("data",), 4 * 16 * 4, ("f32[4,16]",))
    ]


def test_jit_matmul_prints_iotas(mesh):
    f = jax.jit(
        lambda u: u @ u.T,
        in_shardings=NamedSharding(mesh, P(*ALL)),
        out_shardings=NamedSharding(mesh, P("data")),
    )
    text = compiled(f, jnp.ones((16, 32), jnp.float32))
    assert "replica_groups=[4,2]<=[2,4]T(1,0)" in text and "replica_groups=[2,4]<=[8]" in text
    assert hlo.collectives(text, mesh) == [
        hlo.Collective("all-gather", ("data",), 8 * 16 * 4, ("f32[8,16]",)),
        hlo.Collective("all-reduce", ("model",), 8 * 16 * 4, ("f32[8,16]",)),
    ]


def test_jit_resharding_prints_meshes(mesh):
    x = jnp.ones((16, 32), jnp.float32)

    def reshard(src, dst):
        ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        return compiled(jax.jit(lambda u: u * 2, in_shardings=ns(src), out_shardings=ns(dst)), x)

    text = reshard(P(*ALL), P(None, "model"))
    assert "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}" in text
    assert hlo.collectives(text, mesh) == [
        hlo.Collective("all-gather", ("data",), 16 * 8 * 4, ("f32[16,8]",))
    ]
    text = reshard(P(*ALL), P("model", "data"))  # a sub-axis, on a mesh with device_ids
    assert "device_ids=([2,2,2]T(0,2,1)) {'axis_0':(2)2}" in text
    assert hlo.summary(hlo.collectives(text, mesh)) == {
        ("all-to-all", ("model",)): 1,
        ("collective-permute", ALL): 1,
    }


@pytest.mark.parametrize(
    "src, dst, f",
    [
        (P(("model", "data")), P(), lambda u: u.sum(0)),
        (P(None, "model"), P("model"), lambda u: u @ u.T),
        (P("data", None), P("data"), lambda u: u.T @ u),
        (P(*ALL), P("model", "data"), lambda u: u * 2),
        (P(*ALL), P(), lambda u: u * 2),
    ],
)
def test_mesh_form_reads_as_xla_own_list(mesh, src, dst, f):
    """XLA prints the same program's groups as a mesh, or, with RGV3 turned off (an XLA debug
    option, measured on jax 0.10.2), as a list or an iota: both must read the same."""
    ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    lowered = jax.jit(f, in_shardings=ns(src), out_shardings=ns(dst))
    x = jnp.ones((16, 32), jnp.float32)
    as_mesh = collective_lines(compiled(lowered, x), mesh)
    legacy = collective_lines(compiled(lowered, x, xla_enable_rgv3_materialization=False), mesh)
    assert any("replica_groups=mesh[" in ln for ln in as_mesh)
    assert not any("replica_groups=mesh[" in ln for ln in legacy)
    assert len(as_mesh) == len(legacy)
    for a, b in zip(as_mesh, legacy):
        assert hlo.replica_groups(a, 8) == hlo.replica_groups(b, 8), (a, b)
    assert hlo.collectives("\n".join(as_mesh), mesh) == hlo.collectives("\n".join(legacy), mesh)
