"""desired.yaml rendered for a Kubernetes cluster (``cst render kubernetes``).

``render`` turns the desired state into Kubernetes objects, a pure function; ``pool_file`` is the
desired file as the key pool reads it in the cluster; ``output`` writes the objects, byte-stable;
``secrets`` makes the Secrets the objects only name (``cst render kubernetes-secrets``). Nothing
here talks to a cluster: ``kubectl apply``, Argo CD or Flux carry the output there.
"""
