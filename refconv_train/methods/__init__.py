"""The re-parameterization methods: RefConv (:mod:`.refconv`) and the paper's comparison methods (:mod:`.reparam`),
with what they share (:mod:`.protocol`: targets and the report; :mod:`.modules`: exclude patterns, baking a
parametrized weight)."""
