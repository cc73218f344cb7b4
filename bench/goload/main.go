// goload is an open-loop, fixed-rate HTTP/1.1 load generator (wrk has no fixed-rate mode).
//
// Requests are scheduled at start + i/rate whatever the server does, and latency is measured from
// the scheduled time, so a stalled server shows up as latency instead of silently lowering the
// rate (coordinated omission). A request that finds every connection busy for longer than
// -max-lag is not sent and is counted as "late": the rate was then not sustained.
//
// Each request's path is PREFIX/SEQ so the span sink can tell that every request became exactly
// one span. Raw keep-alive connections keep the generator's own CPU cost low on a 2-core machine.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

type result struct {
	Rate        float64 `json:"rate"`
	DurationS   float64 `json:"duration_s"`
	ElapsedS    float64 `json:"elapsed_s"`
	Scheduled   int64   `json:"scheduled"`
	Sent        int64   `json:"sent"`
	OK          int64   `json:"ok"`
	Non2xx      int64   `json:"non_2xx"`
	Errors      int64   `json:"errors"`
	Late        int64   `json:"late"`
	AchievedRPS float64 `json:"achieved_rps"`
	P50Ms       float64 `json:"p50_ms"`
	P99Ms       float64 `json:"p99_ms"`
	MaxMs       float64 `json:"max_ms"`
	FirstError  string  `json:"first_error,omitempty"`
}

type job struct {
	seq   int64
	sched time.Time
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "server host:port (loopback only)")
	prefix := flag.String("prefix", "/b/run", "request path prefix; the sequence number is appended")
	rate := flag.Float64("rate", 1000, "requests per second")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	conns := flag.Int("conns", 32, "keep-alive connections")
	maxLag := flag.Duration("max-lag", time.Second, "a request later than this is not sent (counted late)")
	timeout := flag.Duration("timeout", 5*time.Second, "per-request I/O timeout")
	closeEach := flag.Bool("close", false, "one connection per request (Connection: close)")
	delay := flag.Duration("delay", 0, "wait this long after start-up before sending (lets a tracer inspect this new process first)")
	flag.Parse()

	var sent, ok, non2xx, errs, late atomic.Int64
	var firstErr atomic.Value
	jobs := make(chan job, *conns*64)
	lat := make([][]time.Duration, *conns)
	var wg sync.WaitGroup
	for w := 0; w < *conns; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var c net.Conn
			var br *bufio.Reader
			buf := make([]byte, 0, 256)
			for j := range jobs {
				if time.Since(j.sched) > *maxLag {
					late.Add(1)
					continue
				}
				if c == nil {
					var err error
					c, err = net.DialTimeout("tcp", *addr, *timeout)
					if err != nil {
						errs.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						c = nil
						continue
					}
					br = bufio.NewReaderSize(c, 4096)
				}
				buf = buf[:0]
				buf = append(buf, "GET "...)
				buf = append(buf, *prefix...)
				buf = append(buf, '/')
				buf = strconv.AppendInt(buf, j.seq, 10)
				buf = append(buf, " HTTP/1.1\r\nHost: "...)
				buf = append(buf, *addr...)
				buf = append(buf, "\r\nUser-Agent: kspan-goload\r\n"...)
				if *closeEach {
					buf = append(buf, "Connection: close\r\n"...)
				}
				buf = append(buf, "\r\n"...)
				_ = c.SetDeadline(time.Now().Add(*timeout))
				sent.Add(1)
				_, err := c.Write(buf)
				var resp *http.Response
				if err == nil {
					resp, err = http.ReadResponse(br, nil)
				}
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					c.Close()
					c = nil
					continue
				}
				lat[w] = append(lat[w], time.Since(j.sched))
				if resp.StatusCode/100 == 2 {
					ok.Add(1)
				} else {
					non2xx.Add(1)
				}
				if resp.Close || *closeEach {
					c.Close()
					c = nil
				}
			}
			if c != nil {
				c.Close()
			}
		}(w)
	}

	time.Sleep(*delay)
	// The harness starts its measurement window on this line.
	fmt.Fprintln(os.Stderr, "goload: sending")
	start := time.Now()
	interval := time.Duration(float64(time.Second) / *rate)
	total := int64(*rate * duration.Seconds())
	var scheduled int64
	ticker := time.NewTicker(time.Millisecond)
	for scheduled < total {
		now := time.Now()
		due := int64(now.Sub(start) / interval)
		if due > total {
			due = total
		}
		for ; scheduled < due; scheduled++ {
			j := job{seq: scheduled, sched: start.Add(time.Duration(scheduled) * interval)}
			select {
			case jobs <- j:
			default:
				// Every connection busy and the queue full: the rate is not being sustained.
				late.Add(1)
			}
		}
		<-ticker.C
	}
	ticker.Stop()
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)

	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		i := int(p * float64(len(all)-1))
		return float64(all[i]) / float64(time.Millisecond)
	}
	r := result{
		Rate: *rate, DurationS: duration.Seconds(), ElapsedS: elapsed.Seconds(),
		Scheduled: scheduled, Sent: sent.Load(), OK: ok.Load(), Non2xx: non2xx.Load(),
		Errors: errs.Load(), Late: late.Load(),
		AchievedRPS: float64(ok.Load()+non2xx.Load()) / duration.Seconds(),
		P50Ms: pct(0.50), P99Ms: pct(0.99), MaxMs: pct(1.0),
	}
	if e, isStr := firstErr.Load().(string); isStr {
		r.FirstError = e
	}
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		fmt.Fprintln(os.Stderr, "goload:", err)
		os.Exit(1)
	}
}
