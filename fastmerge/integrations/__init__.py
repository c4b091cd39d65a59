"""Drop-in acceleration of other merging libraries: one line, unchanged user code.

* :mod:`fastmerge.integrations.peft`: ``patch()`` / ``unpatch()`` / ``patched()`` for PEFT's
  ``merge_utils`` and ``LoraModel.add_weighted_adapter``.
* :mod:`fastmerge.integrations.mergekit`: the same for every mergekit 0.1.5 merge method (the
  task-arithmetic family, ``linear``, ``slerp`` and the other methods of
  :mod:`fastmerge.methods`); ``fastmerge mergekit CONFIG OUT`` is the patched ``mergekit-yaml``.

Both take ``patch(rng="torch")``: DARE/DELLA masks drawn with the library's own
``torch.bernoulli`` calls (``_torch_rng``), the merge fused, so runs are bit-identical to the
library's; the default ``rng="philox"`` draws from fastmerge's seeded stream.

Importing these modules never imports PEFT or mergekit; ``patch()`` does, and says clearly when
the library is missing or of a release fastmerge was not tested with.
"""
