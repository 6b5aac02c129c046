"""A ``module:function`` model for the command-line tests (``--model cli_models:slow_lm``).

The tiny GPT-2 saved in ``TRAK_TEST_MODEL``, with a forward pre-hook that sleeps
``TRAK_TEST_DELAY`` seconds (default 0), so that a test can SIGKILL a build in the middle.
The hook changes no value: the features are those of the model directory.
"""
import os
import time


def slow_lm():
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.environ["TRAK_TEST_MODEL"], attn_implementation="eager", local_files_only=True)
    delay = float(os.environ.get("TRAK_TEST_DELAY", "0"))
    if delay:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return model


def not_a_model():
    return "a string"
