"""``nin serve``: a trained model behind an HTTP API, with dynamic batching and a web page.

* :mod:`~nin.serve.config`: :class:`~nin.serve.config.ServeConfig`, the settings (the command's flags follow
  from its fields);
* :mod:`~nin.serve.images`: a request's bytes decoded as ``nin predict`` decodes files; the class-map PNG;
* :mod:`~nin.serve.backends`: the model: a run or checkpoint in PyTorch, or an ONNX file in onnxruntime
  (without torch);
* :mod:`~nin.serve.batcher`: concurrent requests gathered into one forward pass, in one worker thread;
* :mod:`~nin.serve.metrics`: Prometheus counters and histograms, in a registry per app;
* :mod:`~nin.serve.app`: ``create_app(backend, config)``, the FastAPI app: routes, limits, errors;
* :mod:`~nin.serve.server`: ``serve(path, config)``, uvicorn until SIGTERM;
* ``page/``: the web page (plain HTML, JavaScript and CSS).

Nothing is imported here: ``import nin.serve`` is free, and the extra (``pip install 'nin[serve]'``) is
needed only by the modules that use it.
"""
