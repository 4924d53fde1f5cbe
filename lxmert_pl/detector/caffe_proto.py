"""The few caffe protobuf messages a `.caffemodel` loader needs, built at import time without `protoc`.

A `.caffemodel` is a serialised `caffe.NetParameter` (BVLC/caffe `src/caffe/proto/caffe.proto`; the
bottom-up-attention fork uses the same numbers for every field declared here). Only the fields that locate weights
are declared; every other field (layer parameters, ParamSpecs, fillers, ...) is skipped by the protobuf library
itself as an unknown field, by its wire type. Field numbers:

    NetParameter      name 1, input 3, input_shape 8 (BlobShape), layer 100 (LayerParameter),
                      layers 2 (V1LayerParameter)
    LayerParameter    name 1, type 2 (string), bottom 3, top 4, blobs 7 (BlobProto)
    V1LayerParameter  bottom 2, top 3, name 4, type 5 (enum LayerType, read as int32), blobs 6
    BlobProto         shape 7 (BlobShape), data 5 (packed float), diff 6, double_data 8 (packed double),
                      legacy 4-d dims num 1, channels 2, height 3, width 4 (int32)
    BlobShape         dim 1 (packed int64)

The classes live in a private descriptor pool, so they cannot clash with a caffe `caffe_pb2` module a user imports.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "caffe"
_F = descriptor_pb2.FieldDescriptorProto

# V1LayerParameter.LayerType numbers of the layer types that carry weights (caffe.proto), as the V2 type string.
V1_LAYER_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution"}


def _field(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int, *, repeated: bool = False,
           type_name: str | None = None, packed: bool = False) -> None:
    field = message.field.add(name=name, number=number, type=kind)
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name is not None:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if packed:
        field.options.packed = True


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="lxmert_pl/detector/caffe_subset.proto", package=_PACKAGE, syntax="proto2"
    )

    shape = proto.message_type.add(name="BlobShape")
    _field(shape, "dim", 1, _F.TYPE_INT64, repeated=True, packed=True)

    blob = proto.message_type.add(name="BlobProto")
    _field(blob, "shape", 7, _F.TYPE_MESSAGE, type_name="BlobShape")
    _field(blob, "data", 5, _F.TYPE_FLOAT, repeated=True, packed=True)
    _field(blob, "diff", 6, _F.TYPE_FLOAT, repeated=True, packed=True)
    _field(blob, "double_data", 8, _F.TYPE_DOUBLE, repeated=True, packed=True)
    for name, number in (("num", 1), ("channels", 2), ("height", 3), ("width", 4)):
        _field(blob, name, number, _F.TYPE_INT32)

    layer = proto.message_type.add(name="LayerParameter")
    _field(layer, "name", 1, _F.TYPE_STRING)
    _field(layer, "type", 2, _F.TYPE_STRING)
    _field(layer, "bottom", 3, _F.TYPE_STRING, repeated=True)
    _field(layer, "top", 4, _F.TYPE_STRING, repeated=True)
    _field(layer, "blobs", 7, _F.TYPE_MESSAGE, repeated=True, type_name="BlobProto")

    v1_layer = proto.message_type.add(name="V1LayerParameter")
    _field(v1_layer, "bottom", 2, _F.TYPE_STRING, repeated=True)
    _field(v1_layer, "top", 3, _F.TYPE_STRING, repeated=True)
    _field(v1_layer, "name", 4, _F.TYPE_STRING)
    _field(v1_layer, "type", 5, _F.TYPE_INT32)  # an enum in caffe.proto; int32 has the same wire format
    _field(v1_layer, "blobs", 6, _F.TYPE_MESSAGE, repeated=True, type_name="BlobProto")

    net = proto.message_type.add(name="NetParameter")
    _field(net, "name", 1, _F.TYPE_STRING)
    _field(net, "input", 3, _F.TYPE_STRING, repeated=True)
    _field(net, "input_shape", 8, _F.TYPE_MESSAGE, repeated=True, type_name="BlobShape")
    _field(net, "layer", 100, _F.TYPE_MESSAGE, repeated=True, type_name="LayerParameter")
    _field(net, "layers", 2, _F.TYPE_MESSAGE, repeated=True, type_name="V1LayerParameter")
    return proto


def _build_classes() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    names = ("BlobShape", "BlobProto", "LayerParameter", "V1LayerParameter", "NetParameter")
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in names
    }


_CLASSES = _build_classes()
BlobShape = _CLASSES["BlobShape"]
BlobProto = _CLASSES["BlobProto"]
LayerParameter = _CLASSES["LayerParameter"]
V1LayerParameter = _CLASSES["V1LayerParameter"]
NetParameter = _CLASSES["NetParameter"]

__all__ = ["V1_LAYER_TYPES", "BlobProto", "BlobShape", "LayerParameter", "NetParameter", "V1LayerParameter"]
