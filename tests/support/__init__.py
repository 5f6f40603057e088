"""What the tests share: scripted fake models and a bounded wait (``helpers``), the ASGI and
server helpers (``asgi``), rendered-output readers (``render``), the models the pipe tests serve
in a child process (``pipe_targets``), and a real Triton server for ``-m triton``
(``triton_server``)."""
