"""Model families (one module each, see :mod:`megafusion.models.spec` and ``registry``), the
model wrappers that objectives build on (Transfusion, LMFusion), and assembly into megatron-core
``GPTModel`` chunks (``build``)."""
