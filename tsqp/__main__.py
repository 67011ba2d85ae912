import sys

from tsqp.tee.enclave import advice

try:
    from tsqp.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while torch still imports: no traceback
    raise SystemExit(130) from None
except Exception as exc:  # under Gramine: what to change in the build, in one line
    hint = advice(exc)
    if hint is None:
        raise
    print(f"tsqp: error: {hint}", file=sys.stderr)
    raise SystemExit(1) from None
raise SystemExit(code)
