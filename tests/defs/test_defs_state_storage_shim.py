"""The suite's guard against a Dagster 1.13 race (tests/conftest.py): a current DefsStateStorage whose instance is
gone (set by an instance entered elsewhere and never reset by its dispose) must not fail the next definitions load."""

import weakref

import dagster as dg
from dagster._core.storage.defs_state.base import set_defs_state_storage


@dg.asset
def one():
    return 1


class _Gone:
    pass


def test_a_storage_whose_instance_is_gone_does_not_fail_a_materialize():
    with dg.instance_for_test() as instance:
        storage = instance.defs_state_storage
        assert storage is not None
        alive = storage._instance_weakref
        gone = _Gone()
        storage._instance_weakref = weakref.ref(gone)
        del gone  # the weakref is dead now, as after the instance that set it was collected
        try:
            with set_defs_state_storage(storage):
                assert dg.materialize([one], instance=instance).success
        finally:
            storage._instance_weakref = alive
