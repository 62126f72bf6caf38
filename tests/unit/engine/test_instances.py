"""engine/instances.py: one instance per key, made once, dropped with a weakly held key."""

from __future__ import annotations

import gc
import threading

from blendgate.engine.instances import InstancePerKey


class Model:  # weak-referenceable, hashable by identity, as LlamaFamilyModel is
    pass


def test_one_instance_per_key_made_once_even_from_many_threads() -> None:
    made: list[object] = []

    def factory(key: Model) -> list:
        made.append(key)
        return [key]

    per_model: InstancePerKey[Model, list] = InstancePerKey(factory)
    a, b = Model(), Model()
    results: list[list] = []
    threads = [threading.Thread(target=lambda: results.append(per_model.get(a))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and all(result is results[0] for result in results)
    assert per_model.get(b) is not results[0] and len(made) == 2


def test_a_weakly_held_key_takes_its_instance_with_it() -> None:
    per_model: InstancePerKey[Model, str] = InstancePerKey(lambda key: "state")
    model = Model()
    per_model.get(model)
    assert len(per_model.found) == 1
    del model
    gc.collect()
    assert len(per_model.found) == 0
    per_device: InstancePerKey[str, str] = InstancePerKey(str.upper, weak=False)
    assert per_device.get("cuda:0") == "CUDA:0" and per_device.get("cuda:0") is per_device.get("cuda:0")
