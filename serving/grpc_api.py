"""TF Serving's gRPC API over :class:`~serving.service.ServingCore`: the servicers the server registers.

``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``)
and ``tensorflow.serving.ModelService`` (``GetModelStatus``). They only
translate between protos and ServingCore calls, as the REST handler
(:mod:`serving.rest`) does for JSON; a :class:`~serving.errors.ServingError`
aborts the RPC with TF Serving's code and message, and any other exception
with INTERNAL (logged; it never takes the server down).
"""

from __future__ import annotations

import logging

log = logging.getLogger("serving.server")  # one logger for the whole server: its lines name serving.server


def _spec(model_spec):
    from serving.service import Spec

    choice = model_spec.WhichOneof("version_choice")
    return Spec(
        name=model_spec.name,
        version=model_spec.version.value if choice == "version" else None,
        label=model_spec.version_label if choice == "version_label" else None,
        signature_name=model_spec.signature_name,
    )


def _handle(core, context, api: str, model_name: str, fn):
    """Run ``fn`` under metrics; a ServingError aborts the RPC with its code and message."""
    from serving.errors import ServingError
    from serving.tensors import TensorError

    try:
        with core.track(model_name, api, "GRPC"):
            try:
                return fn()
            except TensorError as exc:
                from serving.errors import invalid

                raise invalid(str(exc)) from exc
    except ServingError as exc:
        context.abort(exc.code, exc.message)
    except Exception as exc:  # noqa: BLE001 - a bug must not kill the server; the client sees INTERNAL
        import grpc

        log.exception("%s failed", api)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def servicers(core):
    """``(PredictionService, ModelService, their *_pb2_grpc modules)`` serving ``core``."""
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         predict_pb2, prediction_service_pb2_grpc)

    from serving import tensors

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - gRPC method name
            def run():
                spec = _spec(request.model_spec)
                inputs = {alias: tensors.from_proto(proto) for alias, proto in request.inputs.items()}
                loaded, signature_name, outputs = core.predict(spec, inputs, list(request.output_filter))
                response = predict_pb2.PredictResponse()
                response.model_spec.name = loaded.name
                response.model_spec.version.value = loaded.version
                response.model_spec.signature_name = signature_name
                for alias, value in outputs.items():
                    tensors.to_proto(value, proto=response.outputs[alias])
                return response

            return _handle(core, context, "Predict", request.model_spec.name, run)

        def GetModelMetadata(self, request, context):  # noqa: N802
            def run():
                loaded, signature_map = core.metadata(_spec(request.model_spec), request.metadata_field)
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = loaded.name
                response.model_spec.version.value = loaded.version
                response.metadata["signature_def"].Pack(signature_map)
                return response

            return _handle(core, context, "GetModelMetadata", request.model_spec.name, run)

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):  # noqa: N802
            def run():
                if not request.HasField("model_spec"):  # get_model_status_impl.cc
                    from serving.errors import invalid

                    raise invalid("Missing ModelSpec")
                response = get_model_status_pb2.GetModelStatusResponse()
                for version, state in core.status(_spec(request.model_spec)):
                    status = response.model_version_status.add()
                    status.version = version
                    status.state = state.state
                    status.status.error_code = state.error_code.value[0]
                    status.status.error_message = state.error_message
                return response

            return _handle(core, context, "GetModelStatus", request.model_spec.name, run)

    return PredictionService(), ModelService(), prediction_service_pb2_grpc, model_service_pb2_grpc
