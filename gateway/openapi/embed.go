// Package openapi embeds the OpenAPI v2 spec generated from the protos (buf.gen.yaml, protoc-gen-openapiv2).
package openapi

import _ "embed"

// Spec is parley.swagger.json: every REST route of the four services, with proto field names.
//
//go:embed parley.swagger.json
var Spec []byte
