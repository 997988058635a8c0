"""Registration of the method with mergekit's registry (idempotent)."""


def register_method() -> None:
    from mergekit.merge_methods import registry

    from mergekit_com.method import METHOD_NAME, chain_of_merges

    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(chain_of_merges)
