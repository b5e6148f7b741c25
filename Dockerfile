# repapq-deploy for GPU hosts: NVIDIA's TensorRT container (TensorRT, CUDA and cuDNN preinstalled)
# with this package installed and `repapq-deploy` as the entrypoint.
#   docker build -t repapq-deploy .
#   docker run --rm --gpus all -v "$PWD:/work" repapq-deploy build model.pt --arch repvgg_a0 --calib calib/
FROM nvcr.io/nvidia/tensorrt:25.01-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/repapq-deploy
COPY pyproject.toml README.md ./
COPY repapq_deploy ./repapq_deploy

# TensorRT's Python bindings come with the base image; the [gpu] extra would ask PyPI for them again.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "cuda-python>=12" . \
    && python -c "import tensorrt, repapq_deploy; print('tensorrt', tensorrt.__version__)"

WORKDIR /work
ENTRYPOINT ["repapq-deploy"]
CMD ["--help"]
