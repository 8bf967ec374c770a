# syntax=docker/dockerfile:1
# The project image: the three stages' commands (tlp-preprocess, tlp-train,
# tlp-serve, tlp-client, tlp-loadtest; or python -m preprocessing|trainer|serving)
# and TensorBoard, installed from pyproject.toml pinned by constraints.txt, run
# as a non-root user. Build from the repository root:
#   docker build -t transfer-learning-pipeline:0.1.0 .
# (Not buildable on the project's dev machines: they have no container engine.)
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY preprocessing ./preprocessing
COPY trainer ./trainer
COPY serving ./serving
# Extras from pyproject.toml, comma-separated: gcp (Dataflow), aws (S3).
# The project is also kept as a wheel, for Beam runners that install it on their
# workers (Dataflow: --extra_package=/opt/dist/transfer_learning_pipeline-0.1.0-py3-none-any.whl).
ARG EXTRAS=""
RUN pip install "pip==26.3" \
 && pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
 && pip wheel --no-deps --wheel-dir /opt/dist -c constraints.txt .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="transfer-learning-pipeline" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 tlp && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp tlp
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/dist /opt/dist
# The root filesystem is read-only on the cluster: caches go to /tmp (an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    KERAS_HOME=/tmp/.keras \
    MPLCONFIGDIR=/tmp/.matplotlib \
    TF_CPP_MIN_LOG_LEVEL=1
WORKDIR /workspace
USER 10001:10001
CMD ["tlp-train", "--help"]
