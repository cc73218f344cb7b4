// otlpsink is the benchmark's OTLP trace endpoint: it counts spans and throws them away.
//
// A Python receiver decoding 40,000 spans/s would take a core from the machine under test; this
// sink walks the protobuf wire format by hand (stdlib only: the build is offline) and keeps only
// counters, so the benchmark measures the agent, not the endpoint. It accepts both OTLP transports
// on one port: OTLP/HTTP (POST /v1/traces, protobuf, optionally gzip) and OTLP/gRPC over
// cleartext HTTP/2 (the TraceService/Export method, unary).
//
// Requests from goload have the path /b/PHASE/SEQ; the sink counts server and client spans per
// phase and notes any (phase, seq) seen twice, so "every request became exactly one span" is
// checked request by request. GET /stats returns the counters as JSON.
package main

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	kindServer = 2
	kindClient = 3
)

type phaseStats struct {
	Server    int64 `json:"server"`
	Client    int64 `json:"client"`
	Unique    int64 `json:"unique_server"`
	Duplicate int64 `json:"duplicate_server"`
	// FirstUnixNano is when the sink received this phase's first span.
	FirstUnixNano int64 `json:"first_span_unix_ns"`
	seen          map[int64]struct{}
}

type sink struct {
	mu            sync.Mutex
	Exports       int64                  `json:"exports"`
	Spans         int64                  `json:"spans"`
	Server        int64                  `json:"server_spans"`
	Client        int64                  `json:"client_spans"`
	Undecodable   int64                  `json:"undecodable"`
	FirstUnixNano int64                  `json:"first_span_unix_ns"`
	LastUnixNano  int64                  `json:"last_span_unix_ns"`
	Phases        map[string]*phaseStats `json:"phases"`
	// Health holds the latest value of each kspan.* metric the agent exported about itself
	// (records lost, spans dropped ...), summed over data points.
	Health map[string]float64 `json:"health"`
	// HealthMax is the largest value each one had: a counter read after the agent released its
	// kernel maps can come back as zero in the last export.
	HealthMax      map[string]float64 `json:"health_max"`
	MetricExports  int64              `json:"metric_exports"`
	HealthUnixNano int64              `json:"health_unix_ns"`
}

var errTrunc = errors.New("truncated protobuf")

// field yields each (number, wire type, varint value, bytes) of one protobuf message.
func fields(b []byte, f func(num int, wt int, v uint64, data []byte) error) error {
	for len(b) > 0 {
		key, n := binary.Uvarint(b)
		if n <= 0 {
			return errTrunc
		}
		b = b[n:]
		num, wt := int(key>>3), int(key&7)
		switch wt {
		case 0:
			v, n := binary.Uvarint(b)
			if n <= 0 {
				return errTrunc
			}
			b = b[n:]
			if err := f(num, wt, v, nil); err != nil {
				return err
			}
		case 1:
			if len(b) < 8 {
				return errTrunc
			}
			v := binary.LittleEndian.Uint64(b[:8])
			b = b[8:]
			if err := f(num, wt, v, nil); err != nil {
				return err
			}
		case 5:
			if len(b) < 4 {
				return errTrunc
			}
			b = b[4:]
		case 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || uint64(len(b)-n) < l {
				return errTrunc
			}
			data := b[n : n+int(l)]
			b = b[n+int(l):]
			if err := f(num, wt, 0, data); err != nil {
				return err
			}
		default:
			return fmt.Errorf("wire type %d", wt)
		}
	}
	return nil
}

// anyString returns AnyValue.string_value (field 1).
func anyString(b []byte) string {
	s := ""
	_ = fields(b, func(num, wt int, _ uint64, d []byte) error {
		if num == 1 && wt == 2 {
			s = string(d)
		}
		return nil
	})
	return s
}

// phaseSeq parses /b/PHASE/SEQ out of a path or a full URL.
func phaseSeq(s string) (string, int64, bool) {
	i := strings.Index(s, "/b/")
	if i < 0 {
		return "", 0, false
	}
	rest := s[i+3:]
	j := strings.IndexByte(rest, '/')
	if j < 0 {
		return "", 0, false
	}
	seqStr := rest[j+1:]
	if k := strings.IndexAny(seqStr, "?#/"); k >= 0 {
		seqStr = seqStr[:k]
	}
	seq, err := strconv.ParseInt(seqStr, 10, 64)
	if err != nil {
		return "", 0, false
	}
	return rest[:j], seq, true
}

type spanInfo struct {
	kind uint64
	path string
}

func parseSpan(b []byte) (spanInfo, error) {
	var si spanInfo
	err := fields(b, func(num, wt int, v uint64, d []byte) error {
		switch {
		case num == 6 && wt == 0:
			si.kind = v
		case num == 9 && wt == 2:
			var key, val string
			if err := fields(d, func(n2, w2 int, _ uint64, d2 []byte) error {
				if n2 == 1 && w2 == 2 {
					key = string(d2)
				} else if n2 == 2 && w2 == 2 {
					val = anyString(d2)
				}
				return nil
			}); err != nil {
				return err
			}
			if key == "url.path" || key == "http.target" || (key == "url.full" && si.path == "") {
				si.path = val
			}
		}
		return nil
	})
	return si, err
}

// walk visits every span of an ExportTraceServiceRequest:
// resource_spans(1) -> scope_spans(2) -> spans(2).
func walk(req []byte, visit func(spanInfo)) error {
	return fields(req, func(num, wt int, _ uint64, rs []byte) error {
		if num != 1 || wt != 2 {
			return nil
		}
		return fields(rs, func(n2, w2 int, _ uint64, ss []byte) error {
			if n2 != 2 || w2 != 2 {
				return nil
			}
			return fields(ss, func(n3, w3 int, _ uint64, sp []byte) error {
				if n3 != 2 || w3 != 2 {
					return nil
				}
				si, err := parseSpan(sp)
				if err != nil {
					return err
				}
				visit(si)
				return nil
			})
		})
	})
}

func (s *sink) ingest(req []byte) error {
	var spans []spanInfo
	if err := walk(req, func(si spanInfo) { spans = append(spans, si) }); err != nil {
		s.mu.Lock()
		s.Undecodable++
		s.mu.Unlock()
		return err
	}
	now := time.Now().UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Exports++
	if len(spans) == 0 {
		return nil
	}
	if s.FirstUnixNano == 0 {
		s.FirstUnixNano = now
	}
	s.LastUnixNano = now
	for _, si := range spans {
		s.Spans++
		switch si.kind {
		case kindServer:
			s.Server++
		case kindClient:
			s.Client++
		}
		phase, seq, ok := phaseSeq(si.path)
		if !ok {
			continue
		}
		ps := s.Phases[phase]
		if ps == nil {
			ps = &phaseStats{seen: map[int64]struct{}{}, FirstUnixNano: now}
			s.Phases[phase] = ps
		}
		switch si.kind {
		case kindServer:
			ps.Server++
			if _, dup := ps.seen[seq]; dup {
				ps.Duplicate++
			} else {
				ps.seen[seq] = struct{}{}
				ps.Unique++
			}
		case kindClient:
			ps.Client++
		}
	}
	return nil
}

// numberPoint returns a NumberDataPoint's value: as_double (4, fixed64) or as_int (6, sfixed64).
func numberPoint(b []byte) float64 {
	var val float64
	_ = fields(b, func(num, wt int, v uint64, _ []byte) error {
		if num == 4 && wt == 1 {
			val = math.Float64frombits(v)
		} else if num == 6 && wt == 1 {
			val = float64(int64(v))
		}
		return nil
	})
	return val
}

// ingestMetrics keeps kspan's own health metrics from an ExportMetricsServiceRequest:
// resource_metrics(1) -> scope_metrics(2) -> metrics(2) -> {name(1), gauge(5) | sum(7)} ->
// data_points(1).
func (s *sink) ingestMetrics(req []byte) error {
	found := map[string]float64{}
	err := fields(req, func(num, wt int, _ uint64, rm []byte) error {
		if num != 1 || wt != 2 {
			return nil
		}
		return fields(rm, func(n2, w2 int, _ uint64, sm []byte) error {
			if n2 != 2 || w2 != 2 {
				return nil
			}
			return fields(sm, func(n3, w3 int, _ uint64, m []byte) error {
				if n3 != 2 || w3 != 2 {
					return nil
				}
				var name string
				var total float64
				var points int
				err := fields(m, func(n4, w4 int, _ uint64, d []byte) error {
					switch {
					case n4 == 1 && w4 == 2:
						name = string(d)
					case (n4 == 5 || n4 == 7) && w4 == 2:
						return fields(d, func(n5, w5 int, _ uint64, dp []byte) error {
							if n5 == 1 && w5 == 2 {
								total += numberPoint(dp)
								points++
							}
							return nil
						})
					}
					return nil
				})
				if err == nil && points > 0 && strings.HasPrefix(name, "kspan.") {
					found[name] = total
				}
				return err
			})
		})
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.Undecodable++
		return err
	}
	s.MetricExports++
	if len(found) > 0 {
		s.HealthUnixNano = time.Now().UnixNano()
		for k, v := range found {
			s.Health[k] = v
			if old, ok := s.HealthMax[k]; !ok || v > old {
				s.HealthMax[k] = v
			}
		}
	}
	return nil
}

func readBody(r *http.Request) ([]byte, error) {
	var rd io.Reader = r.Body
	if r.Header.Get("Content-Encoding") == "gzip" {
		gz, err := gzip.NewReader(r.Body)
		if err != nil {
			return nil, err
		}
		defer gz.Close()
		rd = gz
	}
	return io.ReadAll(io.LimitReader(rd, 64<<20))
}

func httpExport(ingest func([]byte) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := readBody(r)
		if err == nil {
			err = ingest(body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.WriteHeader(http.StatusOK)
	}
}

// grpcExport serves a unary OTLP Export method: each message is a 5-byte prefix
// (compressed flag, big-endian length) then the protobuf; the status travels in trailers.
func grpcExport(ingest func([]byte) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { grpcUnary(ingest, w, r) }
}

func grpcUnary(ingest func([]byte) error, w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/grpc")
	w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	status, msg := "0", ""
	switch {
	case err != nil:
		status, msg = "13", err.Error()
	case len(body) < 5:
		status, msg = "13", "short gRPC frame"
	case body[0] != 0:
		var gz *gzip.Reader
		gz, err = gzip.NewReader(bytes.NewReader(body[5:]))
		if err == nil {
			var plain []byte
			plain, err = io.ReadAll(gz)
			if err == nil {
				err = ingest(plain)
			}
		}
		if err != nil {
			status, msg = "13", err.Error()
		}
	default:
		if err = ingest(body[5:]); err != nil {
			status, msg = "13", err.Error()
		}
	}
	w.WriteHeader(http.StatusOK)
	if status == "0" {
		_, _ = w.Write([]byte{0, 0, 0, 0, 0})
	}
	w.Header().Set("Grpc-Status", status)
	w.Header().Set("Grpc-Message", msg)
}

func (s *sink) stats(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(s)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (loopback only)")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "otlpsink:", err)
		os.Exit(1)
	}
	s := &sink{Phases: map[string]*phaseStats{}, Health: map[string]float64{}, HealthMax: map[string]float64{}}
	discard := func([]byte) error { return nil }
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/traces", httpExport(s.ingest))
	mux.HandleFunc("POST /v1/metrics", httpExport(s.ingestMetrics))
	mux.HandleFunc("POST /v1/logs", httpExport(discard))
	mux.HandleFunc("POST /opentelemetry.proto.collector.trace.v1.TraceService/Export", grpcExport(s.ingest))
	mux.HandleFunc("POST /opentelemetry.proto.collector.metrics.v1.MetricsService/Export", grpcExport(s.ingestMetrics))
	mux.HandleFunc("POST /opentelemetry.proto.collector.logs.v1.LogsService/Export", grpcExport(discard))
	mux.HandleFunc("GET /stats", s.stats)
	srv := &http.Server{Handler: mux}
	// gRPC clients speak HTTP/2 with prior knowledge on a plaintext port.
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv.Protocols = &protos
	fmt.Printf("otlpsink: listening on %s\n", ln.Addr())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-sig; os.Exit(0) }()
	if err := srv.Serve(ln); err != nil {
		fmt.Fprintln(os.Stderr, "otlpsink:", err)
		os.Exit(1)
	}
}
