"""Drop-in acceleration of other merging libraries: one line, unchanged user code.

* :mod:`fastmerge.integrations.peft`: ``patch()`` / ``unpatch()`` / ``patched()`` for PEFT's
  ``merge_utils`` and ``LoraModel.add_weighted_adapter``.
* :mod:`fastmerge.integrations.mergekit`: the same for mergekit's task-arithmetic family and
  ``linear``; ``fastmerge mergekit CONFIG OUT`` is the patched ``mergekit-yaml``.

Importing these modules never imports PEFT or mergekit; ``patch()`` does, and says clearly when
the library is missing or of a release fastmerge was not tested with.
"""
