"""``m3d-lite demo``: a Gradio page to ask a trained model about your own scans (``pip install
"m3d-lite[demo]"``). :mod:`~m3d_lite.demo.inputs` checks what a user gives it, with no Gradio needed;
:mod:`~m3d_lite.demo.app` is the page."""
